"""Markou, Ajanthan & Gould (2024), "Guiding Neural Collapse": experiment grids and figure builders.

Three classifier heads are compared (REFERENCE.md sections 3-4):

* ``standard``  -- a learned linear classifier on tau-normalised features whose rows are renormalised
  after every step (the authors' cosine classifier, :class:`nc_lib.nearest_etf.CosineHead`);
  ``standard_nonorm`` -- the same without any normalisation (:class:`nc_lib.heads.LinearHead`), the
  appendix ablation;
* ``fixed_etf`` -- the canonical simplex ETF in the first C coordinates, frozen, bias b = -W mean(batch);
* ``implicit_etf`` -- W = (U* sqrt(C/(C-1))(I - 11^T/C))^T with U* the nearest simplex ETF to the
  running normalised class means (:class:`nc_lib.nearest_etf.ImplicitETFHead`);
  ``implicit_etf_nograd`` -- the same with the node's gradient stopped (the paper's ablation).

UFM experiments (:func:`ufm_grid`, :func:`run_ufm`, trained by :func:`nc_lib.ufm.train_ufm`; on a GPU
with ``device="cuda"`` or ``python -m nc_lib.papers.markou2024 ufm --scale paper --device cuda``). The paper publishes only "2000 iterations, CE,
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
one the paper used for each dataset is not stated. Quick scale: digits (MLP) and MNIST-1D (MLP), 12 epochs, batch 128, 2 seeds.

Cost (:func:`measure_cost`): forward and backward wall time per step of each head on a fixed body,
and memory (:func:`measure_memory`): bytes of the tensors autograd saves for the backward of one step
(activations, incl. the node's) plus parameters, buffers and gradients -- a measurement on any
device; on CUDA also ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots
from torch import Tensor, nn

from ..heads import FixedETFHead, Head, LinearHead
from ..metrics import cosine_margins
from ..nearest_etf import CosineHead, ImplicitETFHead
from ..paths import runs_dir
from ..ufm import UFMConfig, train_ufm
from ..plots import colour, plot_metric_curves
from ..validation import check_choice, check_int, check_positive

SCALES = ("quick", "paper")
PAPER = "markou2024"
NOTEBOOK = "05_nearest_etf"
TAU = 5.0
METHODS = ("standard", "standard_nonorm", "fixed_etf", "implicit_etf", "implicit_etf_nograd")
MAIN_METHODS = ("standard", "fixed_etf", "implicit_etf")
LABELS = {"standard": "standard (cosine)", "standard_nonorm": "standard, no normalisation",
          "fixed_etf": "fixed ETF", "implicit_etf": "implicit ETF", "implicit_etf_nograd": "implicit ETF, no node gradient",
          "implicit_etf_riemannian": "implicit ETF (Riemannian solver)"}
#: the panels of Fig. 2: record key -> title
PANELS = {"loss": "CE loss", "average_cosine_margin": "average cosine margin", "pcm": "PCM at end (sorted)",
          "within_class_variability": "NC1", "classifier_means_alignment": "NC3", "wh_equinorm": "WH-equinorm"}
LOG_PANELS = ("loss", "within_class_variability", "classifier_means_alignment", "wh_equinorm")

# names for the training engine (models.HEADS)
ENGINE_HEADS = {"standard": "cosine", "standard_nonorm": "linear", "fixed_etf": "fixed_etf_centre",
                "implicit_etf": "implicit_etf", "implicit_etf_nograd": "implicit_etf_nograd"}


def _check_scale(scale: str) -> str:
    return check_choice("scale", scale, SCALES)


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# =========================================================================== heads
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


class NormalisedHead(Head):
    """logits = head(tau h/||h||): Markou's feature normalisation in front of any head (fixed ETF here)."""

    def __init__(self, head: Head, tau: float = TAU) -> None:
        super().__init__()
        self.head, self.tau = head, check_positive("tau", tau)
        self.num_classes, self.feature_dim = head.num_classes, head.feature_dim

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.tau * F.normalize(h, dim=1))

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        return self.head.classifier()


def _logits(head: nn.Module, h: Tensor, labels: Tensor) -> Tensor:
    return head(h, labels) if (head.training and getattr(head, "needs_labels", False)) else head(h)


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
    method of :data:`METHODS` for UFM-10 and the three main ones for the larger C. quick: the same C,
    fewer iterations (300 for UFM-10, 200, 150 and 40 for UFM-100, -200, -1000; UFM-1000 with n = 2, d = 1000), d = 64 for C <= 10, 3 seeds for UFM-10, 1 else.
    """
    _check_scale(scale)
    if scale == "paper":
        return {f"ufm{C}": UFMSetting(f"ufm{C}", C, d, n_per_class=20, iterations=2000, seeds=(0, 1, 2, 3, 4),
                                      measure_every=20, methods=METHODS if C == 10 else MAIN_METHODS)
                for C, d in PAPER_UFM.items()}
    return {
        "ufm10": UFMSetting("ufm10", 10, 64, n_per_class=20, iterations=300, seeds=(0, 1, 2), measure_every=10,
                            methods=METHODS),
        "ufm100": UFMSetting("ufm100", 100, 128, n_per_class=5, iterations=200, seeds=(0,), measure_every=20),
        "ufm200": UFMSetting("ufm200", 200, 256, n_per_class=4, iterations=150, seeds=(0,), measure_every=25),
        "ufm1000": UFMSetting("ufm1000", 1000, 1000, n_per_class=2, iterations=40, seeds=(0,), measure_every=20),
    }


RECORD_KEYS = ("step", "loss", "accuracy", "within_class_variability", "classifier_means_alignment", "wh_equinorm",
               "average_cosine_margin")


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


def run_ufm(setting: UFMSetting, method: str, seed: int, *, cache: bool = True,
            device: str | torch.device | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one UFM with one head through :func:`nc_lib.ufm.train_ufm`: full-batch GD + momentum on H
    (and on learned head parameters), the config of :func:`ufm_config`.

    objective = (1/N) sum_i CE(head(h_i), y_i) + lambda_H/2 ||H||^2 + lambda_W/2 ||W, b||^2 (learned heads);
    the cosine head's rows are renormalised after each step. Measured at every iteration up to
    ``measure_every``, then every ``measure_every`` iterations. Returns ``{"records": [...], "pcm": sorted
    per-sample cosine margins at the end, "method", "seed", "setting", "device"}``; cached under
    ``runs_dir()/markou2024/`` (a finished run is loaded, not retrained, whatever device made it).
    ``device``: None (CPU), "auto" or "cuda" for the paper scale.
    """
    check_choice("method", method, METHODS)
    check_int("seed", seed, 0)
    key = {"setting": setting.to_dict(), "method": method, "seed": seed, "v": 3}
    path = runs_dir() / PAPER / f"ufm-{setting.name}-{method}-s{seed}-{_hash(key)}.pt"
    if cache and path.exists():
        return torch.load(path, weights_only=False)
    # every iteration measured over the first measure_every (Fig. 3's early rise, the same for every head),
    # then every measure_every
    dense = min(setting.measure_every, setting.iterations)
    history = train_ufm(ufm_config(setting, method, seed), steps=dense, measure_every=1, progress=progress,
                        device=device)
    history = train_ufm(None, steps=setting.iterations - dense, measure_every=setting.measure_every,
                        history=history, progress=progress)
    records = [{k: r[k] for k in RECORD_KEYS} for r in history.records]
    cfg = history.config
    with torch.no_grad():
        H = history.model.H.detach()
        feats = H if cfg.measurement_tau is None else cfg.measurement_tau * F.normalize(H, dim=1)
        W, _ = history.model.classifier()
        pcm = torch.sort(cosine_margins(feats, history.labels, W, feats.mean(0))).values.cpu().numpy()
    out = {"records": records, "pcm": pcm, "method": method, "seed": seed, "setting": setting.to_dict(),
           "device": str(history.device), "seconds": history.elapsed}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def run_ufm_grid(grid: dict[str, UFMSetting], *, names: Sequence[str] | None = None, progress: bool = True,
                 device: str | torch.device | None = None,
                 methods: Sequence[str] | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``results[setting][method] = [run per seed]`` for the settings ``names`` (default all) and of each
    the ``methods`` it has (default all of them)."""
    if methods is not None:
        for m in methods:
            check_choice("methods", m, METHODS)
    names = list(grid) if names is None else list(names)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in names:
        s = grid[check_choice("names", name, list(grid))]
        out[name] = {}
        for m in s.methods:
            if methods is not None and m not in methods:
                continue
            t0 = time.perf_counter()
            out[name][m] = [run_ufm(s, m, seed, device=device) for seed in s.seeds]
            if progress:
                print(f"{name} {m}: {len(s.seeds)} seed(s), {time.perf_counter() - t0:.1f}s, final acc "
                      f"{statistics.median(r['records'][-1]['accuracy'] for r in out[name][m]):.3f}")
    return out


# =========================================================================== real data
OPTIMIZERS = ("agd", "sgd")


def real_grid(scale: str = "quick", optimizer: str = "agd") -> dict[str, dict[str, Any]]:
    """Real-data settings keyed by the figure they feed: ``fig4`` (ImageNet ResNet50) and the appendix
    ``cifar10_resnet18``, ``cifar100_resnet50``, ``stl10``, ``vgg13``. Each holds ``dataset``, ``model``,
    ``epochs``, ``batch_size``, ``seeds``, ``methods``, ``report_epochs`` (the paper's 50 and 200, or the
    proportional epochs at quick scale), ``config`` (TrainConfig keywords) and ``stands_for``.

    quick: digits (MLP) stands for CIFAR10/STL10/VGG13, MNIST-1D (MLP, 150 per class) for CIFAR100 and ImageNet
    (a deeper MLP, depth 4, for ImageNet ResNet50 and VGG13, depth 2 otherwise, width 128; STL10's stand-in
    is digits at 60 per class, the small-data setting);
    12 epochs (report epochs 3 and 12 = 50/200 and 200/200 of the run), batch 128, 2 seeds.

    Every scale draws stratified batches (every class in every batch, as the paper) and trains with
    ``optimizer``: ``"agd"`` (the released scripts: automatic gradient descent, no lr, no schedule, no weight
    decay, biases and BN affine parameters frozen; :mod:`nc_lib.agd`) or ``"sgd"`` (lr 0.05, momentum 0.9,
    weight decay 5e-4, lr x0.1 at epochs 100 and 150 of 200, proportionally at quick scale).
    """
    _check_scale(scale)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if scale == "paper":
        common = dict(epochs=200, batch_size=256, seeds=(0, 1, 2, 3, 4), report_epochs=(50, 200),
                      optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="multistep",
                      milestones=(100, 150), augment=True)
        spec = {"fig4": ("imagenet", "resnet50", "ImageNet ResNet50"),
                "cifar10_resnet18": ("cifar10", "resnet18", "CIFAR10 ResNet18"),
                "cifar100_resnet50": ("cifar100", "resnet50", "CIFAR100 ResNet50"),
                "stl10": ("stl10", "resnet18", "STL10 ResNet18"),
                "vgg13": ("cifar10", "vgg13", "CIFAR10 VGG13")}
        measure = tuple(range(5, 201, 5))
    else:
        common = dict(epochs=12, batch_size=128, seeds=(0, 1), report_epochs=(3, 12), optimizer="sgd", lr=0.05,
                      momentum=0.9, weight_decay=5e-4, schedule="multistep", milestones=(6, 9), augment=False)
        spec = {"fig4": ("mnist1d", "mlp", "ImageNet ResNet50"),
                "cifar10_resnet18": ("digits", "mlp", "CIFAR10 ResNet18"),
                "cifar100_resnet50": ("mnist1d", "mlp", "CIFAR100 ResNet50"),
                "stl10": ("digits", "mlp", "STL10"),
                "vgg13": ("digits", "mlp", "VGG13")}
        measure = (1, 3, 6, 9, 12)
    out = {}
    for key, (ds, net, stands) in spec.items():
        kw = {k: common[k] for k in ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                                     "schedule", "milestones", "augment")}
        kw.update(dataset=ds, model=net, measure_epochs=measure, train_sample_pass=True, stratified_batches=True)
        if optimizer == "agd":
            kw.update(optimizer="agd", weight_decay=0.0, schedule="none", milestones=())
        if scale == "paper":  # ResNets: the CIFAR stem on 32x32 (and STL10's 96x96) images, the ImageNet stem on ImageNet
            kw["model_kwargs"] = {"stem": "imagenet" if ds == "imagenet" else "cifar"} if net.startswith("resnet") else {}
        if scale == "quick":
            # small MLPs (feature dim 128 >= C); MNIST-1D subsampled to 150 per class to fit the time budget
            kw["model_kwargs"] = {"hidden": 128, "depth": 4 if key in ("vgg13", "fig4") else 2}
            if ds == "mnist1d":
                kw["per_class"] = 150
            if key == "stl10":
                kw["per_class"] = 60  # STL10 is the small-data setting (500 per class): digits at 60 per class
        out[key] = {"dataset": ds, "model": net, "stands_for": stands, "config": kw, "seeds": common["seeds"],
                    "optimizer": optimizer,
                    "methods": MAIN_METHODS, "report_epochs": common["report_epochs"], "epochs": common["epochs"]}
    return out


def train_config(entry: dict[str, Any], method: str, seed: int) -> Any:
    """The :class:`nc_lib.train.TrainConfig` of one real-data run."""
    from ..train import TrainConfig

    check_choice("method", method, METHODS)
    return TrainConfig(head=ENGINE_HEADS[method], seed=seed, tag=PAPER, **entry["config"])


def grid(scale: str = "quick", optimizer: str = "agd") -> dict[str, dict[str, Any]]:
    """Every real-data run as ``{entry: {"<method> seed <s>": TrainConfig}}`` (for :mod:`nc_lib.cluster`:
    ``python -m nc_lib.cluster dry-run --paper markou2024 --scale paper``)."""
    return {key: {f"{m} seed {seed}": train_config(e, m, seed) for m in e["methods"] for seed in e["seeds"]}
            for key, e in real_grid(scale, optimizer).items()}


def run_real(entry: dict[str, Any], *, methods: Sequence[str] | None = None, progress: bool = False,
             pcm: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Train (or load) every method x seed of one real-data entry. Returns ``{method: [run per seed]}``, each
    run ``{"records": history with "step" = epoch, "loss" = train loss, "accuracy" = train top-1,
    "accuracy_test", ...; "pcm": sorted per-sample cosine margins of the final model on the training set}``."""
    from ..train import train

    out: dict[str, list[dict[str, Any]]] = {}
    for m in (methods or entry["methods"]):
        runs = []
        for seed in entry["seeds"]:
            res = train(train_config(entry, m, seed), progress=progress)
            recs = []
            for r in res.history:
                rec = dict(r)
                rec.update(step=r["epoch"], loss=r["train_loss"], accuracy=r["train_accuracy"],
                           accuracy_test=r["test_accuracy"])
                recs.append(rec)
            run = {"records": recs, "method": m, "seed": seed}
            if pcm:
                run["pcm"] = _final_pcm(res, entry, m)
            runs.append(run)
        out[m] = runs
    return out


def _final_pcm(result: Any, entry: dict[str, Any], method: str) -> np.ndarray:
    """Sorted per-sample cosine margins of the trained model on its (un-augmented) training set."""
    from ..data import load_train_test, make_loader

    cfg = result.config
    train_set, _ = load_train_test(
        cfg.dataset, root=cfg.data_root, per_class=cfg.per_class, test_per_class=cfg.test_per_class,
        seed=cfg.data_seed, augment=False, random_labels=cfg.random_labels,
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.dataset_kwargs.items()})
    model = result.model()
    model.eval()
    feats, ys = [], []
    with torch.no_grad():
        for x, y in make_loader(train_set, 512):
            feats.append(model.features(x).double())
            ys.append(y)
    h, y = torch.cat(feats), torch.cat(ys)
    if method != "standard_nonorm":
        h = TAU * F.normalize(h, dim=1)
    W, _ = model.head.classifier()
    return torch.sort(cosine_margins(h, y, W.double(), h.mean(0))).values.numpy()


# =========================================================================== figures
def _runs_records(results: dict[str, list[dict[str, Any]]], methods: Sequence[str]) -> dict[str, list]:
    return {LABELS[m]: [r["records"] for r in results[m]] for m in methods if m in results}


def figure_panels(results: dict[str, list[dict[str, Any]]], *, methods: Sequence[str] | None = None,
                  extra_keys: Sequence[str] = (), title: str = "", x_title: str = "iteration") -> go.Figure:
    """Markou's panel set (Fig. 2): CE loss, average cosine margin, PCM at the end (sorted margins vs sample
    index), NC1, NC3, WH-equinorm, plus ``extra_keys`` (e.g. train/test top-1); a curve per method, the
    median over seeds with the min-max range shaded."""
    methods = [m for m in (methods or list(results)) if m in results]
    if not methods:
        raise ValueError(f"results hold none of the methods; have {sorted(results)}.")
    keys = [k for k in PANELS if k != "pcm"] + list(extra_keys)
    curves = plot_metric_curves(_runs_records(results, methods), keys, x="step", log_y=list(LOG_PANELS),
                                titles={**PANELS, "accuracy": "train top-1", "accuracy_test": "test top-1"},
                                x_title=x_title, cols=3)
    order = list(PANELS) + list(extra_keys)
    n = len(order)
    cols = 3
    rows = math.ceil(n / cols)
    titles = [{**PANELS, "accuracy": "train top-1", "accuracy_test": "test top-1"}[k] for k in order]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=0.18)
    # copy the curves of plot_metric_curves into our layout (keys in its order -> our position)
    axis_of = {}
    for i, k in enumerate(keys):
        axis_of["" if i == 0 else str(i + 1)] = k
    for tr in curves.data:
        suffix = (tr.xaxis or "x")[1:]
        k = axis_of[suffix]
        pos = order.index(k)
        fig.add_trace(tr, row=pos // cols + 1, col=pos % cols + 1)
    for i, k in enumerate(order):
        r, c = i // cols + 1, i % cols + 1
        if k in LOG_PANELS:
            fig.update_yaxes(type="log", row=r, col=c)
        fig.update_xaxes(title_text="sample (sorted)" if k == "pcm" else x_title, row=r, col=c)
    # PCM: sorted per-sample margins at the end, median and range over seeds
    pr, pc = order.index("pcm") // cols + 1, order.index("pcm") % cols + 1
    for j, m in enumerate(methods):
        pcms = [np.asarray(r["pcm"]) for r in results[m] if "pcm" in r]
        if not pcms:
            continue
        P = np.stack(pcms)
        xs = np.arange(P.shape[1])
        col = colour(j)  # plot_metric_curves colours labels in order
        fig.add_trace(go.Scatter(x=xs, y=np.median(P, 0), mode="lines", line=dict(color=col), name=LABELS[m],
                                 legendgroup=LABELS[m], showlegend=False), row=pr, col=pc)
        if P.shape[0] > 1:
            fig.add_trace(go.Scatter(x=np.r_[xs, xs[::-1]], y=np.r_[P.max(0), P.min(0)[::-1]], fill="toself",
                                     line=dict(width=0), fillcolor=col, opacity=0.2, hoverinfo="skip",
                                     showlegend=False, legendgroup=LABELS[m]), row=pr, col=pc)
    fig.update_layout(title=title, height=330 * rows, width=1150, template="plotly_white")
    return fig


def figure_accuracy_vs_classes(ufm_results: dict[str, dict[str, list[dict[str, Any]]]], *,
                               methods: Sequence[str] = MAIN_METHODS) -> go.Figure:
    """Fig. 3: UFM top-1 training accuracy over iterations, a panel per C (10, 100, 200, 1000)."""
    names = sorted(ufm_results, key=lambda s: int(s.replace("ufm", "")))
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[f"UFM-{n[3:]}" for n in names])
    for i, name in enumerate(names):
        sub = plot_metric_curves(_runs_records(ufm_results[name], methods), ["accuracy"], x="step")
        for tr in sub.data:
            tr.showlegend = (i == 0) and tr.showlegend is not False
            fig.add_trace(tr, row=1, col=i + 1)
        fig.update_xaxes(title_text="iteration", row=1, col=i + 1)
    fig.update_yaxes(title_text="train top-1", row=1, col=1)
    fig.update_layout(height=380, width=300 * len(names) + 150, template="plotly_white",
                      title="UFM top-1 accuracy as C grows")
    return fig


def first_full_accuracy(ufm_results: dict[str, dict[str, list[dict[str, Any]]]], *,
                        methods: Sequence[str] = MAIN_METHODS) -> dict[str, dict[str, float | None]]:
    """``{setting: {method: median over seeds of the first measured iteration with 100% train accuracy}}``
    (None where a seed never gets there): the number Fig. 3 is about."""
    out: dict[str, dict[str, float | None]] = {}
    for name, by_method in ufm_results.items():
        out[name] = {}
        for m in methods:
            if m not in by_method:
                continue
            steps = [next((r["step"] for r in run["records"] if r["accuracy"] >= 1.0), None) for run in by_method[m]]
            out[name][m] = None if None in steps else float(statistics.median(steps))
    return out


def accuracy_note(ufm_results: dict[str, dict[str, list[dict[str, Any]]]], *,
                  methods: Sequence[str] = MAIN_METHODS) -> str:
    """Fig. 3's finding in words, from the runs: when each head first reaches 100% train accuracy per C."""
    first = first_full_accuracy(ufm_results, methods=methods)
    parts = []
    for name in sorted(first, key=lambda s: int(s.replace("ufm", ""))):
        steps = ", ".join(f"{LABELS[m]} {'never' if v is None else f'{v:g}'}" for m, v in first[name].items())
        parts.append(f"UFM-{name[3:]}: {steps}")
    return "First measured iteration with 100% train accuracy (median over seeds): " + "; ".join(parts) + "."


def figure_schematic() -> go.Figure:
    """Fig. 1: CNN -> features -> normalised means -> nearest-ETF node -> W = U* M, with the two gradient
    paths (through the features directly, and through the node), drawn with plotly shapes."""
    fig = go.Figure()

    def box(x0: float, x1: float, y0: float, y1: float, text: str, fill: str) -> None:
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line=dict(color="black"), fillcolor=fill,
                      layer="below")
        fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False, font=dict(size=13))

    def arrow(x0: float, y0: float, x1: float, y1: float, col: str = "black", dash: bool = False,
              text: str = "") -> None:
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                           arrowhead=3, arrowsize=1.3, arrowwidth=2.5 if not dash else 2, arrowcolor=col, text="")
        if text:
            fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2 + 0.22, text=text, showarrow=False,
                               font=dict(size=11, color=col))

    box(0.0, 1.4, 1.5, 3.0, "CNN<br>f(x; θ)", "#dbe9f6")
    box(2.0, 3.4, 1.5, 3.0, "features h<br>h ← τ h/‖h‖", "#e8f4e0")
    box(4.0, 5.6, 3.2, 4.6, "normalised means<br>H̄ = H_t/‖H_t‖<br>(running average)", "#fff2cc")
    box(6.2, 7.8, 3.2, 4.6, "nearest-ETF node<br>U* = argmin ‖H̄ − U M̃‖²<br>+ δ/2 ‖U − U_prox‖²", "#fde0dd")
    box(8.4, 9.9, 3.2, 4.6, "classifier<br>W = (U* M)ᵀ<br>b = −W μ_G", "#eadcf8")
    box(8.4, 9.9, 0.3, 1.7, "logits W h + b<br>→ CE loss", "#f2f2f2")
    arrow(1.4, 2.25, 2.0, 2.25)
    arrow(3.4, 2.6, 4.0, 3.9)
    arrow(5.6, 3.9, 6.2, 3.9)
    arrow(7.8, 3.9, 8.4, 3.9)
    arrow(9.15, 3.2, 9.15, 1.7)
    arrow(3.4, 1.9, 8.4, 1.0)
    # gradient paths (backward): red = direct through features, purple = through the node
    arrow(8.4, 0.55, 3.4, 1.55, col="#d62728", text="∂L/∂h (direct path)")
    arrow(7.0, 5.2, 3.0, 5.2, col="#9467bd", text="∂L/∂H̄ through the node (implicit differentiation)")
    fig.add_shape(type="line", x0=9.15, y0=4.6, x1=9.15, y1=5.2, line=dict(color="#9467bd", width=2, dash="dot"))
    fig.add_shape(type="line", x0=9.15, y0=5.2, x1=7.0, y1=5.2, line=dict(color="#9467bd", width=2, dash="dot"))
    fig.add_shape(type="line", x0=3.0, y0=5.2, x1=2.7, y1=3.0, line=dict(color="#9467bd", width=2, dash="dot"))
    fig.add_annotation(x=4.8, y=0.2, text="M = √(C/(C−1)) (I − 11ᵀ/C),  M̃ = (I − 11ᵀ/C)/√(C−1)",
                       showarrow=False, font=dict(size=12))
    fig.update_xaxes(visible=False, range=[-0.2, 10.1])
    fig.update_yaxes(visible=False, range=[-0.1, 5.8])
    fig.update_layout(width=1150, height=480, template="plotly_white", title="The implicit ETF classifier",
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


# =========================================================================== cost and memory
def _stratified_batch(C: int, batch: int, d_in: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(batch) % C
    return torch.randn(batch, d_in, generator=g), y


def _body(d_in: int, d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d))


def measure_cost(num_classes: int, feature_dim: int, *, methods: Sequence[str] = METHODS + ("implicit_etf_riemannian",),
                 batch_size: int = 256, steps: int = 20, warmup: int = 3, d_in: int = 64, hidden: int = 256,
                 body: Callable[[], nn.Module] | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Wall time of forward (body + head + CE) and backward per training step for each method, on one
    body and a batch with every class (C <= batch_size) -- measured, ``steps`` steps after ``warmup``.
    Returns ``{method: {"forward_s": [...], "backward_s": [...], "iterations": [...]}}`` (the Riemannian
    solver's iteration counts; closed form: 0)."""
    C, d = check_int("num_classes", num_classes, 2), check_int("feature_dim", feature_dim, 2)
    if d < C:
        raise ValueError(f"feature_dim must be >= num_classes; got {d} < {C}.")
    out = {}
    for m in methods:
        torch.manual_seed(seed)
        net = body() if body is not None else _body(d_in, d, hidden)
        head = make_head(m, d, C)
        params = [p for p in list(net.parameters()) + list(head.parameters()) if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3)
        fwd, bwd, its = [], [], []
        for s in range(warmup + steps):
            x, y = _stratified_batch(C, batch_size, d_in, seed + s) if body is None else body.batch(s)  # type: ignore[attr-defined]
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(_logits(head, net(x), y), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            if s >= warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                its.append(int(getattr(head, "last_iterations", 0)))
        out[m] = {"forward_s": fwd, "backward_s": bwd, "iterations": its}
    return out


def measure_memory(num_classes: int, feature_dim: int, *, methods: Sequence[str] = METHODS, batch_size: int = 256,
                   d_in: int = 64, hidden: int = 256, ufm_n: int | None = None) -> dict[str, dict[str, float]]:
    """Memory of one training step per method, measured: the bytes of every distinct tensor autograd
    saves for the backward (``torch.autograd.graph.saved_tensors_hooks``, plus the tensors and arrays
    custom Functions keep on ``ctx``, e.g. the node's SVD factors), plus parameters, buffers and gradients; on CUDA also the peak allocated. The head's own
    share (``head_saved_bytes``) is what is saved after the body's output exists. ``ufm_n``: a UFM step
    instead (no body; the features are a free C*ufm_n x d parameter, full batch).
    ``kkt_dense_bytes`` (implicit heads): the size of the paper's dense KKT matrix for this (C, d), computed
    by :func:`nc_lib.nearest_etf.kkt_memory_bytes` (not built)."""
    from ..nearest_etf import kkt_memory_bytes

    C, d = check_int("num_classes", num_classes, 2), check_int("feature_dim", feature_dim, 2)
    out = {}
    for m in methods:
        torch.manual_seed(0)
        head = make_head(m, d, C)
        if ufm_n is None:
            net: nn.Module = _body(d_in, d, hidden)
            x, y = _stratified_batch(C, batch_size, d_in)
        else:
            n = check_int("ufm_n", ufm_n, 1)
            free = nn.Parameter(torch.randn(C * n, d) / math.sqrt(d))
            net = _FreeFeatures(free)
            x, y = torch.empty(0), torch.arange(C).repeat_interleave(n)
        seen: dict[tuple[int, int], int] = {}

        def pack(t: Tensor) -> Tensor:
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                seen[key] = t.untyped_storage().nbytes()
            except Exception:  # noqa: BLE001 - sparse or wrapper tensors: count their elements
                seen[(id(t), 0)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = net(x)
            n_body = sum(seen.values())
            loss = F.cross_entropy(_logits(head, h, y), y)
        seen.update(_ctx_saved(loss.grad_fn))
        saved = sum(seen.values())
        loss.backward()
        static = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(head.parameters())
                     + list(net.buffers()) + list(head.buffers()))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in list(net.parameters()) + list(head.parameters())
                    if p.grad is not None)
        out[m] = {"saved_bytes": float(saved), "head_saved_bytes": float(saved - n_body),
                  "static_bytes": float(static), "grad_bytes": float(grads), "total_bytes": float(saved + static + grads),
                  "kkt_dense_bytes": float(kkt_memory_bytes(C, d, torch.float32)) if m.startswith("implicit") else 0.0}
    return out


def _ctx_saved(root: Any) -> dict[tuple[int, int], int]:
    """Tensors and arrays that custom autograd Functions keep as ``ctx`` attributes (not through
    ``save_for_backward``, so the saved-tensor hooks miss them): walk the graph from ``root``."""
    found: dict[tuple[int, int], int] = {}
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for v in getattr(node, "__dict__", {}).values():
            if isinstance(v, Tensor):
                st = v.untyped_storage()
                found[(st.data_ptr(), st.nbytes())] = st.nbytes()
            elif isinstance(v, np.ndarray):
                base = v if v.base is None else v.base
                found[(id(base), base.nbytes)] = int(base.nbytes)
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))
    return found


class _FreeFeatures(nn.Module):
    """The UFM's 'body': returns the free features whatever the input."""

    def __init__(self, H: nn.Parameter) -> None:
        super().__init__()
        self.H = H

    def forward(self, x: Tensor) -> Tensor:
        return self.H * 1.0


def figure_cost(cost: dict[str, dict[str, Any]], *, title: str = "") -> go.Figure:
    """Fig. 5: (a) forward time per method (box of per-step times; the implicit heads' mean and median
    marked), (b) forward and backward time per method (median, bars)."""
    methods = list(cost)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["(a) forward time per step", "(b) forward and backward time"])
    for j, m in enumerate(methods):
        ms = 1e3 * np.asarray(cost[m]["forward_s"])
        fig.add_trace(go.Box(y=ms, name=LABELS.get(m, m), marker_color=colour(j), showlegend=False, boxmean=True),
                      row=1, col=1)
        if m.startswith("implicit"):
            for stat, val, pos in (("mean", ms.mean(), "top right"), ("median", np.median(ms), "bottom right")):
                fig.add_trace(go.Scatter(x=[LABELS.get(m, m)], y=[val], mode="markers+text", text=[f"{stat} {val:.2f}"],
                                         textposition=pos, marker=dict(symbol="line-ew-open", size=22, color="black"),
                                         textfont=dict(size=10), showlegend=False), row=1, col=1)
    names = [LABELS.get(m, m) for m in methods]
    fig.add_trace(go.Bar(x=names, y=[1e3 * float(np.median(cost[m]["forward_s"])) for m in methods], name="forward"),
                  row=1, col=2)
    fig.add_trace(go.Bar(x=names, y=[1e3 * float(np.median(cost[m]["backward_s"])) for m in methods], name="backward"),
                  row=1, col=2)
    fig.update_layout(barmode="stack", height=450, width=1150, template="plotly_white", title=title)
    fig.update_yaxes(title_text="ms (log)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="ms (median per step)", row=1, col=2)
    return fig


def figure_cost_settings(costs: dict[str, dict[str, dict[str, Any]]]) -> go.Figure:
    """Appendix cost: a panel per setting, forward + backward median time per method (stacked bars)."""
    names = list(costs)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
    for i, s in enumerate(names):
        ms = list(costs[s])
        labels = [LABELS.get(m, m) for m in ms]
        for part, col in (("forward_s", "#1f77b4"), ("backward_s", "#ff7f0e")):
            fig.add_trace(go.Bar(x=labels, y=[1e3 * float(np.median(costs[s][m][part])) for m in ms],
                                 name=part.split("_")[0], marker_color=col, showlegend=(i == 0)), row=1, col=i + 1)
    fig.update_layout(barmode="stack", height=480, width=420 * len(names) + 100, template="plotly_white")
    fig.update_yaxes(title_text="ms per step (median)", row=1, col=1)
    return fig


# =========================================================================== tables
def _median_range(vals: Sequence[float]) -> str:
    v = [100 * x for x in vals]
    return f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]"


def _at_epoch(records: list[dict[str, Any]], epoch: int, key: str) -> float:
    best = min(records, key=lambda r: abs(r["step"] - epoch))
    return float(best[key])


def accuracy_table(real_results: dict[str, dict[str, list[dict[str, Any]]]], grid: dict[str, dict[str, Any]],
                   key: str = "accuracy") -> list[dict[str, Any]]:
    """Tables 1 (``key="accuracy"``, train) and 2 (``"accuracy_test"``): per setting and method, top-1 (%) at
    the report epochs, median [min, max] over seeds."""
    check_choice("key", key, ("accuracy", "accuracy_test"))
    rows = []
    for name, res in real_results.items():
        e = grid[name]
        for m, runs in res.items():
            row = {"setting": e["stands_for"], "run": f"{e['dataset']} {e['model']}", "method": LABELS[m]}
            for ep in e["report_epochs"]:
                row[f"epoch {ep}"] = _median_range([_at_epoch(r["records"], ep, key) for r in runs])
            rows.append(row)
    return rows


def memory_table(memories: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Table 3 rows: per setting and method, measured memory in MiB (saved-for-backward, of it the head's,
    total with parameters and gradients)."""
    rows = []
    for s, mem in memories.items():
        for m, v in mem.items():
            rows.append({"setting": s, "method": LABELS.get(m, m),
                         "saved for backward (MiB)": round(v["saved_bytes"] / 2 ** 20, 3),
                         "of which head (MiB)": round(v["head_saved_bytes"] / 2 ** 20, 3),
                         "total incl. params+grads (MiB)": round(v["total_bytes"] / 2 ** 20, 3),
                         "paper's dense KKT matrix, float32 (MiB, computed)": (
                             round(v["kkt_dense_bytes"] / 2 ** 20, 1) if m == "implicit_etf" else "-")})
    return rows


# =========================================================================== the solver, for teaching
def solver_convergence(num_classes: int = 5, feature_dim: int = 8, *, delta: float = 1e-3, max_iter: int = 12,
                       perturbation: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """The Riemannian trust-region solver against the closed form on a random problem.

    Hbar random (d x C, centred, unit norm); U_prox the previous step's solution, simulated as the nearest ETF
    of Hbar + perturbation * noise (as in training, where the means move a little per step; a large
    perturbation is a far start); Z = Hbar Mt + (delta/2) U_prox; for k = 0..max_iter the solver's iterate after
    k iterations (warm-started at U_prox, as the paper) and
    ``dist[k] = ||U_k - polar(Z)||_F`` and ``gap[k] = <Z, polar(Z)> - <Z, U_k>`` (>= 0: the objective gap, the
    closed form maximises <Z, U>); also the singular values of Z (the smallest is ~delta/2: why delta)."""
    from ..nearest_etf import apply_mt, polar_factor, riemannian_polar

    C, d = check_int("num_classes", num_classes, 2), check_int("feature_dim", feature_dim, 2)
    if d < C:
        raise ValueError(f"feature_dim must be >= num_classes; got {d} < {C}.")
    max_iter = check_int("max_iter", max_iter, 0)
    g = torch.Generator().manual_seed(seed)
    Hb = torch.randn(d, C, generator=g, dtype=torch.float64)
    Hb = Hb - Hb.mean(1, keepdim=True)
    Hb = Hb / Hb.norm()
    if perturbation < 0:
        raise ValueError(f"perturbation must be >= 0; got {perturbation}.")
    P = Hb + perturbation * torch.randn(d, C, generator=g, dtype=torch.float64)
    U0, _, _ = polar_factor(apply_mt(P) + 1e-3 * torch.eye(d, C, dtype=torch.float64), "svd")
    Z = apply_mt(Hb) + delta / 2 * U0
    U_star, _, _ = polar_factor(Z, "svd")
    best = float((Z * U_star).sum())
    dist, gap, iters = [], [], []
    for k in range(max_iter + 1):
        Uk, it = riemannian_polar(Z, U0, max_iter=k, tol=0.0) if k else (U0, 0)
        dist.append(float((Uk - U_star).norm()))
        gap.append(max(best - float((Z * Uk).sum()), 0.0))
        iters.append(k)
    sv = torch.linalg.svdvals(Z)
    sv0 = torch.linalg.svdvals(apply_mt(Hb))
    return {"iterations": iters, "dist": dist, "gap": gap, "singular_values": sv.tolist(),
            "singular_values_delta0": sv0.tolist(), "delta": delta, "C": C, "d": d, "perturbation": perturbation}


def figure_solver_convergence(conv: dict[str, Any]) -> go.Figure:
    """(a) distance to the closed form and objective gap per Riemannian iteration (log y), (b) singular values
    of Z with and without the proximal term."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Riemannian trust region vs closed form",
                                                        f"singular values of Z (delta = {conv['delta']:g})"])
    eps = 1e-17
    fig.add_trace(go.Scatter(x=conv["iterations"], y=[max(v, eps) for v in conv["dist"]], mode="lines+markers",
                             name="||U_k − polar(Z)||"), row=1, col=1)
    fig.add_trace(go.Scatter(x=conv["iterations"], y=[max(v, eps) for v in conv["gap"]], mode="lines+markers",
                             name="objective gap"), row=1, col=1)
    k = list(range(1, conv["C"] + 1))
    fig.add_trace(go.Bar(x=k, y=[max(v, eps) for v in conv["singular_values_delta0"]], name="delta = 0"), row=1, col=2)
    fig.add_trace(go.Bar(x=k, y=[max(v, eps) for v in conv["singular_values"]], name=f"delta = {conv['delta']:g}"),
                  row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="iteration", row=1, col=1)
    fig.update_xaxes(title_text="index i of s_i", row=1, col=2)
    fig.update_layout(height=400, width=1100, template="plotly_white", barmode="group")
    return fig


def table_html(rows: list[dict[str, Any]]) -> str:
    """A list of row dicts as an HTML table (for display in the notebook without pandas)."""
    import html as _html

    if not rows:
        raise ValueError("rows must not be empty.")
    cols = list(rows[0])
    head = "".join(f"<th>{_html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# =========================================================================== command line
def ufm_summary(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per (setting, method): median [min, max] over seeds of the final accuracy (%), NC1, NC3 and
    average cosine margin, the first step with 100% accuracy (median) and the median seconds per run."""
    rows = []
    for name, by_method in results.items():
        for method, runs in by_method.items():
            last = [r["records"][-1] for r in runs]
            first_full = [next((rec["step"] for rec in r["records"] if rec["accuracy"] >= 1.0), None) for r in runs]
            reached = [s for s in first_full if s is not None]
            def spread(key: str, scale: float = 1.0) -> str:
                v = [scale * rec[key] for rec in last]
                return f"{statistics.median(v):.4g} [{min(v):.4g}, {max(v):.4g}]"

            rows.append({"setting": name, "method": method, "seeds": len(runs), "accuracy_pct": spread("accuracy", 100),
                         **{k: spread(k) for k in ("within_class_variability", "classifier_means_alignment",
                                                   "average_cosine_margin")},
                         "step_100pct": statistics.median(reached) if len(reached) == len(runs) else None,
                         "seconds": statistics.median(r.get("seconds", float("nan")) for r in runs),
                         "device": runs[0].get("device", "cpu")})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nc_lib.papers.markou2024 ufm --scale paper --device cuda [--only ufm1000] [--json out.json]``:
    train (or load from the run store) the UFM grid of a scale and print the summary table; the notebook
    then draws the figures from the finished runs in seconds."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m nc_lib.papers.markou2024", description=main.__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("ufm", help="train the UFM grid (Figs. 2-3 and the appendix UFM panels)")
    u.add_argument("--scale", choices=SCALES, default="quick")
    u.add_argument("--device", default=None, help="cpu (default), cuda or auto")
    u.add_argument("--only", nargs="*", default=None, help="settings to run (ufm10 ufm100 ufm200 ufm1000)")
    u.add_argument("--methods", nargs="*", default=None, help=f"heads to run (of {', '.join(METHODS)})")
    u.add_argument("--json", default=None, help="also write the summary rows to this JSON file")
    a = p.parse_args(argv)
    grid = ufm_grid(a.scale)
    results = run_ufm_grid(grid, names=a.only, device=a.device, methods=a.methods)
    rows = ufm_summary(results)
    cols = list(rows[0])
    print("\t".join(cols))
    for r in rows:
        print("\t".join(str(r[c]) for c in cols))
    if a.json:
        Path(a.json).write_text(json.dumps({"scale": a.scale, "settings": {n: grid[n].to_dict() for n in results},
                                            "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
