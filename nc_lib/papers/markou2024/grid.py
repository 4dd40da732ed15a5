"""Markou et al. (2024)'s experiment grids: the scales, the methods and their heads, each run's configuration.

UFM experiments (:func:`ufm_grid`; trained by :func:`nc_lib.papers.markou2024.runs.run_ufm` through
:func:`nc_lib.ufm.train_ufm`). The paper publishes only "2000 iterations, CE,
UFM-10/100/200/1000, d = 512 for UFM-10". The settings it leaves open, chosen here:
full-batch gradient descent with momentum 0.9 on the free features H (N x d, entries N(0, 1/d), so
rows start near unit norm) and on the learned head parameters, lr = 0.1 per sample (the mean CE gives
each h_i a gradient 1/N of its own loss's, so H's step is lr N on (1/N) sum_i CE, i.e. lr on each sample's
CE; lambda_H/N likewise), weight decay lambda_H = 5e-4 per sample on the raw features and
lambda_W = 5e-4 on learned classifier parameters, tau = 5,
n = 20 samples per class, d = 512 (UFM-10/100/200) and d = 1024 (UFM-1000, d >= C for the solver),
seeds 0-4. Full batch means every class is in every batch (the stratification the implicit head
needs holds trivially). Metrics are taken, as Markou does, on tau-normalised features
(h <- tau h/||h||) for every normalised head, on raw features for ``standard_nonorm``:
CE loss, average cosine margin, NC1 = Tr(Sigma_W Sigma_B^+)/C, NC3 (Zhu), WH-equinorm, top-1
accuracy, and at the end the per-sample cosine margins (PCM, sorted).

Real-data experiments (:func:`real_grid`) run through :func:`nc_lib.train.train`: paper scale
CIFAR10 ResNet18, CIFAR100 ResNet50, STL10 ResNet18 (the paper's STL10 network is not stated; we take
ResNet18), ImageNet ResNet50, CIFAR10 VGG13; 200 epochs, batch 256, tau 5 (the heads' default), seeds
0-4, crop+flip augmentation, stratified batches (every class in every batch). Optimiser: AGD as the released
scripts (:mod:`nc_lib.agd`; no lr, schedule or weight decay; biases and BN affine frozen), or SGD
(lr 0.05, momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 100 and 150) with ``optimizer="sgd"``; which
one the paper used for each dataset is not stated. ``medium``: that protocol (epochs, batch, optimiser,
schedule, augmentation) on Fashion-MNIST (offline), sized like Papyan's medium grid (the dry run prices it at
1.9 CPU hours on the 2-core machine that prices Papyan's at 1.3): the per-class count (:data:`MEDIUM_PER_CLASS`;
STL10's small-data stand-in :data:`MEDIUM_STL10_PER_CLASS`, two stratified batches of 256), the widths
(ResNet18 x :data:`MEDIUM_WIDTH`, ResNet50 x :data:`MEDIUM_RESNET50_WIDTH`, VGG13 x :data:`MEDIUM_VGG13_WIDTH`),
:data:`MEDIUM_SEEDS` seeds and the ImageNet stem on every ResNet (so the ImageNet and CIFAR100 stand-ins are
the same runs, as at quick) and no augmentation (:data:`MEDIUM_AUGMENT`).
``quick``: Fashion-MNIST and narrow convolutional networks (width 1/8, ImageNet stem: 28 -> 7 pixels),
:data:`QUICK_PER_CLASS` images per class (STL10's stand-in :data:`QUICK_STL10_PER_CLASS`), 12 epochs,
batch 128, 2 seeds.

The UFM grid's ``medium`` scale is the paper's, with one seed instead of five for UFM-1000: a UFM-1000 step
takes about 1.4 s on a loaded 2-core CPU (README, ``bench_ufm.py``), so 2,000 steps are about 45 minutes a
run there, while the paper's whole grid takes 8 minutes on one H100 (docs/results/).

Every number that sets the size of a scale is here, in :func:`ufm_grid`, :data:`PAPER_UFM` and :func:`real_grid`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ...config import TrainConfig, grid_amp
from ...heads import CosineHead, FixedETFHead, Head, ImplicitETFHead, LinearHead, NormalisedHead
from ...ufm import UFMConfig
from ...validation import SCALES, check_choice, check_int, check_positive, check_scale

PAPER = "markou2024"
NOTEBOOK = "05_nearest_etf"
TAU = 5.0
METHODS = ("standard", "standard_nonorm", "fixed_etf", "implicit_etf", "implicit_etf_nograd")
MAIN_METHODS = ("standard", "fixed_etf", "implicit_etf")
LABELS = {"standard": "standard (cosine)", "standard_nonorm": "standard, no normalisation",
          "fixed_etf": "fixed ETF", "implicit_etf": "implicit ETF", "implicit_etf_nograd": "implicit ETF, no node gradient",
          "implicit_etf_riemannian": "implicit ETF (Riemannian solver)"}

ENGINE_HEADS = {"standard": "cosine", "standard_nonorm": "linear", "fixed_etf": "fixed_etf_centre",
                "implicit_etf": "implicit_etf", "implicit_etf_nograd": "implicit_etf_nograd"}


def _check_scale(scale: str) -> str:
    return check_scale(scale)


def make_head(method: str, feature_dim: int, num_classes: int, tau: float = TAU, **kw: Any) -> Head:
    """The head of one method (see the module doc). ``fixed_etf`` is wrapped to see tau-normalised features."""
    check_choice("method", method, METHODS + ("implicit_etf_riemannian",))
    d, C = feature_dim, num_classes
    if method == "standard":
        return CosineHead(d, C, tau=tau)
    if method == "standard_nonorm":
        return LinearHead(d, C, bias=True)
    if method == "fixed_etf":
        return NormalisedHead(FixedETFHead(d, C, bias="centre"), tau)
    if method == "implicit_etf_riemannian":
        return ImplicitETFHead(d, C, tau=tau, solver="riemannian", **kw)
    return ImplicitETFHead(d, C, tau=tau, backprop_through_node=(method == "implicit_etf"), **kw)


# =========================================================================== UFM
@dataclass(frozen=True)
class UFMSetting:
    """One UFM experiment: C classes, d features, n per class, iterations, optimiser settings, seeds."""

    name: str
    num_classes: int
    feature_dim: int
    n_per_class: int = 20
    iterations: int = 2000
    lr: float = 0.1
    momentum: float = 0.9
    lambda_H: float = 5e-4
    lambda_W: float = 5e-4
    tau: float = TAU
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    measure_every: int = 20
    methods: tuple[str, ...] = MAIN_METHODS

    def __post_init__(self) -> None:
        C = check_int("num_classes", self.num_classes, 2)
        d = check_int("feature_dim", self.feature_dim, 1)
        if d < C:
            raise ValueError(f"feature_dim must be >= num_classes (the nearest-ETF solver needs d >= C); "
                             f"got feature_dim={d}, num_classes={C}.")
        check_int("n_per_class", self.n_per_class, 1)
        check_int("iterations", self.iterations, 1)
        check_int("measure_every", self.measure_every, 1)
        check_positive("lr", self.lr)
        for m in self.methods:
            check_choice("methods", m, METHODS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: paper-scale UFM sizes: C -> d (d >= C for the solver; d = 512 as the paper for UFM-10)
PAPER_UFM = {10: 512, 100: 512, 200: 512, 1000: 1024}


def ufm_grid(scale: str = "quick") -> dict[str, UFMSetting]:
    """The UFM settings per scale, keyed ``ufm10, ufm100, ufm200, ufm1000``.

    paper: 2000 iterations (the paper), n = 20 per class, d of :data:`PAPER_UFM`, 5 seeds, every
    method of :data:`METHODS` for UFM-10 and the three main ones for the larger C. medium: the same, UFM-1000
    with one seed. quick: the same C,
    fewer iterations (300 for UFM-10, 200, 150 and 40 for UFM-100, -200, -1000; UFM-1000 with n = 2, d = 1000), d = 64 for C <= 10, 3 seeds for UFM-10, 1 else.
    """
    _check_scale(scale)
    if scale in ("paper", "medium"):
        # medium: the paper's settings, UFM-1000 with one seed (about 45 minutes a run on a 2-core CPU)
        return {f"ufm{C}": UFMSetting(f"ufm{C}", C, d, n_per_class=20, iterations=2000,
                                      seeds=(0,) if scale == "medium" and C == 1000 else (0, 1, 2, 3, 4),
                                      measure_every=20, methods=METHODS if C == 10 else MAIN_METHODS)
                for C, d in PAPER_UFM.items()}
    return {
        "ufm10": UFMSetting("ufm10", 10, 64, n_per_class=20, iterations=300, seeds=(0, 1, 2), measure_every=10,
                            methods=METHODS),
        "ufm100": UFMSetting("ufm100", 100, 128, n_per_class=5, iterations=200, seeds=(0,), measure_every=20),
        "ufm200": UFMSetting("ufm200", 200, 256, n_per_class=4, iterations=150, seeds=(0,), measure_every=25),
        "ufm1000": UFMSetting("ufm1000", 1000, 1000, n_per_class=2, iterations=40, seeds=(0,), measure_every=20),
    }


def ufm_config(setting: UFMSetting, method: str, seed: int) -> UFMConfig:
    """The :class:`nc_lib.ufm.UFMConfig` of one run: the settings of the module doc in the UFM engine's terms.

    The mean CE over N samples gives each h_i a gradient 1/N of its own loss's, so H's learning rate is
    lr N and its weight decay lambda_H/N (i.e. lr and lambda_H per sample's CE); learned head parameters
    take lr and lambda_W (biases too). Features start as N(0, 1/d) entries (rows near unit norm), a learned
    linear head's rows likewise; measurements use tau h/||h|| for every normalised head."""
    check_choice("method", method, METHODS)
    C, d, n = setting.num_classes, setting.feature_dim, setting.n_per_class
    N = C * n

    def head(feature_dim: int, num_classes: int) -> Head:
        return make_head(method, feature_dim, num_classes, tau=setting.tau)

    head.__name__ = f"markou2024_{method}"
    return UFMConfig(num_classes=C, n_per_class=n, feature_dim=d, loss="ce", optimizer="gd", lr=setting.lr,
                     lr_H=setting.lr * N, momentum=setting.momentum, lambda_H=setting.lambda_H / N,
                     lambda_W=setting.lambda_W, lambda_b=setting.lambda_W, head=head, init_scale=1 / math.sqrt(d),
                     seed=seed, measurement_tau=None if method == "standard_nonorm" else setting.tau,
                     snapshot_classes=1, snapshot_features_per_class=0)


# =========================================================================== real data
OPTIMIZERS = ("agd", "sgd")


#: quick real data: Fashion-MNIST images per class (STL10's small-data stand-in fewer), network width
QUICK_PER_CLASS = 100
QUICK_STL10_PER_CLASS = 30
#: quick real data: test images per class (measuring the whole 10,000-image test set was half of each quick run's time)
QUICK_TEST_PER_CLASS = 100
QUICK_WIDTH = 0.125
#: medium real data: Fashion-MNIST images per class (test set whole) and the factor on every width
MEDIUM_PER_CLASS = 200
MEDIUM_STL10_PER_CLASS = 50
MEDIUM_WIDTH = 0.25
#: medium ResNet50 and VGG13 widths (with every width x0.25, the CIFAR stem and five seeds the dry run priced the grid
#: at 26.9 CPU hours on a 2-core machine)
MEDIUM_RESNET50_WIDTH = 0.0625
MEDIUM_VGG13_WIDTH = 0.125
#: medium seeds (the paper's five made 75 runs) and stem (the ImageNet stem, 28 -> 7 pixels, on every ResNet:
#: the CIFAR stem keeps 28 x 28 maps through layer1 and costs about 8x more)
MEDIUM_SEEDS = (0, 1)
MEDIUM_STEM = "imagenet"
#: medium augmentation: none. With the paper's crop + flip the width-0.25 ResNet18 ended 200 epochs of AGD at 90-93%
#: training accuracy (every method, seeds 0 and 1): it never fits its training set, as the paper's networks do
MEDIUM_AUGMENT = False

#: the real-data entries: key -> (the paper's dataset, network, name)
REAL_ENTRIES = {"fig4": ("imagenet", "resnet50", "ImageNet ResNet50"),
                "cifar10_resnet18": ("cifar10", "resnet18", "CIFAR10 ResNet18"),
                "cifar100_resnet50": ("cifar100", "resnet50", "CIFAR100 ResNet50"),
                "stl10": ("stl10", "resnet18", "STL10 ResNet18"),
                "vgg13": ("cifar10", "vgg13", "CIFAR10 VGG13")}


def real_grid(scale: str = "quick", optimizer: str = "agd", *, amp: bool | None = None) -> dict[str, dict[str, Any]]:
    """Real-data settings keyed by the figure they feed: ``fig4`` (ImageNet ResNet50) and the appendix
    ``cifar10_resnet18``, ``cifar100_resnet50``, ``stl10``, ``vgg13``. Each holds ``dataset``, ``model``,
    ``epochs``, ``batch_size``, ``seeds``, ``methods``, ``report_epochs`` (the paper's 50 and 200, or the
    proportional epochs at quick scale), ``config`` (TrainConfig keywords), ``stands_for`` and ``per_class``.

    paper: the paper's datasets and networks (CIFAR stem on CIFAR/STL10, ImageNet stem on ImageNet), 200
    epochs, batch 256, 5 seeds, crop + flip. medium: the same protocol on Fashion-MNIST with
    :data:`MEDIUM_PER_CLASS` per class (STL10's stand-in :data:`MEDIUM_STL10_PER_CLASS`), the medium widths,
    :data:`MEDIUM_SEEDS` seeds and the ImageNet stem (see the module docstring). quick: Fashion-MNIST, every network at width :data:`QUICK_WIDTH` with the ImageNet stem
    (ResNet50 for ImageNet and CIFAR100 -- the same runs, Fashion-MNIST has 10 classes --, ResNet18 for
    CIFAR10 and STL10, VGG13 for VGG13), :data:`QUICK_PER_CLASS` per class (STL10: :data:`QUICK_STL10_PER_CLASS`),
    no augmentation, 12 epochs (report epochs 3 and 12 = 50/200 and 200/200 of the run), batch 128, 2 seeds,
    :data:`QUICK_TEST_PER_CLASS` test images per class.

    ``amp``: bfloat16 autocast of the training passes on a GPU (:func:`nc_lib.config.grid_amp`: on at paper scale
    unless ``amp=False``; measurements stay float32).

    Every scale draws stratified batches (every class in every batch, as the paper) and trains with
    ``optimizer``: ``"agd"`` (the released scripts: automatic gradient descent, no lr, no schedule, no weight
    decay, biases and BN affine parameters frozen; :mod:`nc_lib.agd`) or ``"sgd"`` (lr 0.05, momentum 0.9,
    weight decay 5e-4, lr x0.1 at epochs 100 and 150 of 200, proportionally at quick scale).
    """
    _check_scale(scale)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if scale in ("paper", "medium"):
        common = dict(epochs=200, batch_size=256, seeds=MEDIUM_SEEDS if scale == "medium" else (0, 1, 2, 3, 4),
                      report_epochs=(50, 200),
                      optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="multistep",
                      milestones=(100, 150), augment=MEDIUM_AUGMENT if scale == "medium" else True)
        measure = tuple(range(5, 201, 5))
    else:
        common = dict(epochs=12, batch_size=128, seeds=(0, 1), report_epochs=(3, 12), optimizer="sgd", lr=0.05,
                      momentum=0.9, weight_decay=5e-4, schedule="multistep", milestones=(6, 9), augment=False)
        measure = (1, 3, 6, 9, 12)
    out = {}
    for key, (paper_ds, net, stands) in REAL_ENTRIES.items():
        kw = {k: common[k] for k in ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                                     "schedule", "milestones", "augment")}
        kw.update(measure_epochs=measure, train_sample_pass=True, stratified_batches=True)
        if grid_amp(scale, amp):
            kw["amp"] = True
        if optimizer == "agd":
            kw.update(optimizer="agd", weight_decay=0.0, schedule="none", milestones=())
        per_class = None
        if scale == "paper":
            ds = paper_ds
        else:
            ds = "fashionmnist"
            if scale == "medium":
                per_class = MEDIUM_STL10_PER_CLASS if key == "stl10" else MEDIUM_PER_CLASS
                kw["width"] = {"resnet50": MEDIUM_RESNET50_WIDTH, "vgg13": MEDIUM_VGG13_WIDTH}.get(net, MEDIUM_WIDTH)
            else:
                per_class = QUICK_STL10_PER_CLASS if key == "stl10" else QUICK_PER_CLASS
                kw["width"] = QUICK_WIDTH
                kw["test_per_class"] = QUICK_TEST_PER_CLASS
            kw["per_class"] = per_class
        if net.startswith("resnet"):
            # the CIFAR stem on 32x32 (and STL10's 96x96) images, the ImageNet stem on ImageNet; quick: the
            # ImageNet stem everywhere (28 -> 7 pixels, 10x cheaper)
            kw["model_kwargs"] = {"stem": "imagenet" if paper_ds == "imagenet" or scale == "quick" else
                                  MEDIUM_STEM if scale == "medium" else "cifar"}
        kw.update(dataset=ds, model=net)
        out[key] = {"dataset": ds, "model": net, "stands_for": stands, "config": kw, "seeds": common["seeds"],
                    "optimizer": optimizer, "per_class": per_class, "scale": scale,
                    "methods": MAIN_METHODS, "report_epochs": common["report_epochs"], "epochs": common["epochs"]}
    return out


def real_note(entry: dict[str, Any]) -> str:
    """What differs from the paper for one real-data entry of :func:`real_grid` (for its figure's note)."""
    opt = entry["optimizer"].upper()
    cfg = entry["config"]
    if entry["scale"] == "paper":
        return (f"{opt}, stratified batches of 256" + (" (the released scripts' optimiser)." if opt == "AGD" else
                " (the released scripts use AGD)."))
    net = {"resnet18": "ResNet18", "resnet50": "ResNet50", "vgg13": "VGG13"}[entry["model"]]
    stem = cfg.get("model_kwargs", {}).get("stem")
    arch = f"{net} at width {cfg['width']:g}" + (f" ({stem} stem)" if stem else "")
    if entry["scale"] == "medium":
        same = " (the same runs as the ImageNet stand-in: one stem, and Fashion-MNIST has 10 classes, not 100)" \
            if entry["stands_for"].startswith("CIFAR100") else ""
        return (f"Medium: the paper's protocol ({entry['epochs']} epochs, {opt}, stratified batches of "
                f"{cfg['batch_size']}, tau {TAU:g}) on Fashion-MNIST "
                f"with {entry['per_class']} images per class (full test set) instead of {entry['stands_for']}'s "
                f"dataset; {arch}{same}; the ImageNet stem on every ResNet (28 -> 7 pixels; the paper: CIFAR stem on "
                f"CIFAR and STL10); no augmentation (the paper: crop + flip; with it the ResNet18 ended at 90-93% "
                f"training accuracy); {len(entry['seeds'])} seed{'s' if len(entry['seeds']) != 1 else ''} instead of 5. x = epoch; metrics on "
                "tau-normalised features.")
    same = " (the same runs as the ImageNet stand-in: Fashion-MNIST has 10 classes, not 100)" \
        if entry["stands_for"].startswith("CIFAR100") else ""
    return (f"Quick: Fashion-MNIST, {entry['per_class']} training and {cfg['test_per_class']} test images per class "
            f"(paper: the whole sets), {arch}{same}, no "
            f"augmentation, {entry['epochs']} epochs, {len(entry['seeds'])} seeds, {opt}, stratified batches of "
            f"{cfg['batch_size']} (paper: {entry['stands_for']}, 200 epochs, batch 256, crop + flip, 5 seeds). "
            "x = epoch; metrics on tau-normalised features.")


def train_config(entry: dict[str, Any], method: str, seed: int) -> TrainConfig:
    """The :class:`nc_lib.config.TrainConfig` of one real-data run."""
    check_choice("method", method, METHODS)
    return TrainConfig(head=ENGINE_HEADS[method], seed=seed, tag=PAPER, **entry["config"])


def grid(scale: str = "quick", optimizer: str = "agd", *, amp: bool | None = None) -> dict[str, dict[str, Any]]:
    """Every real-data run as ``{entry: {"<method> seed <s>": TrainConfig}}`` (for :mod:`nc_lib.cluster`:
    ``python -m nc_lib.cluster dry-run --paper markou2024 --scale paper``). ``amp``: see :func:`real_grid`."""
    return {key: {f"{m} seed {seed}": train_config(e, m, seed) for m in e["methods"] for seed in e["seeds"]}
            for key, e in real_grid(scale, optimizer, amp=amp).items()}
