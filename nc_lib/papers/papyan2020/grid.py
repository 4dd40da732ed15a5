"""Papyan, Han & Donoho (2020)'s experiment grid: the datasets, networks and protocol of each run, per scale.

:func:`grid` returns the :class:`~nc_lib.config.TrainConfig` of every run, keyed by
``(dataset, network)``:

- ``paper``: the 7 datasets x 3 networks of the paper, in the likely assignment of REFERENCE.md
  section 3 (the exact depths per dataset are not confirmed by the paper): MNIST VGG11/ResNet18/
  DenseNet40, FashionMNIST VGG11/ResNet18/DenseNet250, CIFAR10 VGG13/ResNet18/DenseNet40, CIFAR100
  VGG13/ResNet50/DenseNet250, SVHN VGG11/ResNet18/DenseNet40, STL10 VGG11/ResNet18/DenseNet201,
  ImageNet VGG13/ResNet50/DenseNet201. Papyan's protocol (:func:`nc_lib.config.papyan_preset`): CE,
  SGD momentum 0.9, weight decay 5e-4 (1e-4 ImageNet), batch 128, 350 epochs (300 ImageNet), lr x0.1
  at epochs/3 and 2 epochs/3, no augmentation, per-pixel standardisation, class-balanced subsets
  (MNIST 5000/class, SVHN 4600/class, ImageNet 600/class; the others are balanced already), the
  50 measurement epochs of his Colab (rescaled to 300 for ImageNet). The paper picks lr from 25
  log-spaced values in [1e-4, 0.25] by best final test error (:func:`nc_lib.train.lr_sweep`, a
  25-run sweep per cell); the learning rates found are not published, so the default here is his
  Colab's MNIST value :data:`DEFAULT_LR` = 0.0679 and ``grid("paper", lrs={...})`` takes the sweep's
  results. ResNets use the CIFAR stem (3x3 conv, stride 1, no max-pool; the Colab's MNIST ResNet18)
  except on ImageNet (ImageNet stem); DenseNet201 keeps its ImageNet stem (STL10's 96x96 images).
- ``quick``: Papyan's protocol on Fashion-MNIST (offline, Debian's ``dataset-fashion-mnist``), 350 epochs,
  lr x0.1 at 116 and 233, his 50 measurement epochs, sized for minutes on 2 CPU cores: 20 training and 50 test
  images per class (:data:`QUICK_DATASETS`), VGG11 at width 1/8, ResNet18 at width 1/4 and DenseNet-BC-40 at width 1
  (standing for DenseNet250), both with the ImageNet stem (:data:`QUICK_NETWORKS`), weight decay
  :data:`QUICK_WEIGHT_DECAY` = 1e-2 instead of 5e-4 and lr 0.04: with 2 steps per epoch Papyan's 5e-4 would
  shrink the weights 20x less over the run; hand-picked so that every run reaches zero training error in the
  first tenth of training and NC1 falls more than 10x over the terminal phase (no sweep). Batch-norm statistics
  are recomputed from the training set before each measurement (``precise_bn``): with 2 steps per epoch the
  running averages lag behind the weights while the learning rate is large, and eval mode then measured a
  network the weights no longer were (DenseNet's training accuracy wobbled below 100% until the first decay).
- ``medium``: Papyan's protocol unchanged on Fashion-MNIST with 300 training images per class and reduced widths
  (:data:`MEDIUM_NETWORKS`, :data:`MEDIUM_PER_CLASS`). Batch-norm statistics are recomputed before each measurement
  here too (``precise_bn``; training is untouched): with 24 steps per epoch the running averages still lag, and
  measured VGG11's terminal phase from epoch 92 where the weights already fit every training image by epoch 38.

Every number that sets the size of a scale is here (:data:`PAPER_NETWORKS`, :data:`QUICK_DATASETS`,
:data:`QUICK_NETWORKS`, :data:`QUICK_WEIGHT_DECAY`, :data:`QUICK_EPOCHS`, :data:`MEDIUM_NETWORKS`,
:data:`MEDIUM_PER_CLASS`), with the names the figures print (:data:`DATASET_NAMES`, :func:`network_label`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ...config import PAPYAN_EPOCHS, TrainConfig, papyan_measure_epochs, papyan_preset
from ...validation import SCALES, check_choice, check_int


#: The 7 datasets x 3 networks of the paper (REFERENCE.md section 3, the likely assignment).
PAPER_NETWORKS: dict[str, tuple[str, str, str]] = {
    "mnist": ("vgg11", "resnet18", "densenet40"),
    "fashionmnist": ("vgg11", "resnet18", "densenet250"),
    "cifar10": ("vgg13", "resnet18", "densenet40"),
    "cifar100": ("vgg13", "resnet50", "densenet250"),
    "svhn": ("vgg11", "resnet18", "densenet40"),
    "stl10": ("vgg11", "resnet18", "densenet201"),
    "imagenet": ("vgg13", "resnet50", "densenet201"),
}
#: Papyan's class-balanced subsets (images per class); the other datasets are balanced already.
PAPER_PER_CLASS: dict[str, int] = {"mnist": 5000, "svhn": 4600, "imagenet": 600}
#: Epochs per dataset (350; 300 for ImageNet).
PAPER_EPOCHS: dict[str, int] = {ds: (300 if ds == "imagenet" else 350) for ds in PAPER_NETWORKS}
#: Learning rate when no sweep result is given: the authors' Colab value (MNIST, ResNet18, CE).
DEFAULT_LR = 0.0679

#: quick scale: Papyan's protocol on Fashion-MNIST with few images, narrow networks and a larger weight decay.
#: dataset -> (training images per class, test images per class)
QUICK_DATASETS: dict[str, tuple[int | None, int | None]] = {"fashionmnist": (20, 50)}
#: network -> (width multiplier, model options, learning rate)
QUICK_NETWORKS: dict[str, tuple[float, dict[str, Any], float]] = {
    "vgg11": (0.125, {}, 0.04),
    "resnet18": (0.25, {"stem": "imagenet"}, 0.04),
    "densenet40": (1.0, {"bc": True, "stem": "imagenet"}, 0.04),
}
#: weight decay at quick scale (Papyan: 5e-4). Weight decay alone shrinks the weights by exp(-wd sum_t lr_t / (1 - momentum))
#: over a run: e^-20 in Papyan's Fashion-MNIST run (469 steps per epoch), but only 0.975 with 200 images (2 steps per
#: epoch) at 5e-4; 1e-2 gives 0.60, enough of the norm-balancing pull that drives collapse in 700 steps.
QUICK_WEIGHT_DECAY = 1e-2
QUICK_EPOCHS = 350

#: medium scale: Papyan's protocol unchanged (350 epochs, SGD momentum 0.9, weight decay 5e-4, batch 128,
#: lr x0.1 at 1/3 and 2/3, his 50 measurement epochs, no augmentation) on Fashion-MNIST, with only the
#: per-class count and the widths reduced (and the ImageNet stem on ResNet/DenseNet, 3-8x cheaper on 28x28):
#: network -> (width multiplier, model options). DenseNet-BC-40 stands for the paper's DenseNet250.
MEDIUM_NETWORKS: dict[str, tuple[float, dict[str, Any]]] = {
    "vgg11": (0.25, {}),
    "resnet18": (0.5, {"stem": "imagenet"}),
    "densenet40": (1.0, {"bc": True, "stem": "imagenet"}),
}
#: (training images per class, test images per class) at medium scale
MEDIUM_PER_CLASS: tuple[int, int | None] = (300, None)

DATASET_NAMES = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
                 "svhn": "SVHN", "stl10": "STL10", "imagenet": "ImageNet", "digits": "digits (8x8)",
                 "mnist1d": "MNIST-1D", "gaussian": "Gaussian mixture", "fake": "FakeData"}
FAMILIES = ("mlp", "vgg", "resnet", "densenet")
FAMILY_NAMES = {"mlp": "MLP", "vgg": "VGG", "resnet": "ResNet", "densenet": "DenseNet"}

Key = tuple[str, str]


def family(network: str) -> str:
    """The network family of a model name: 'mlp', 'vgg', 'resnet' or 'densenet'."""
    for f in FAMILIES:
        if network.startswith(f):
            return f
    raise ValueError(f"network {network!r} is in no family; valid families: {list(FAMILIES)}.")


def network_label(network: str) -> str:
    """'resnet18' -> 'ResNet18'."""
    f = family(network)
    return FAMILY_NAMES[f] + network[len(f):]


def grid(scale: str = "quick", *, lrs: Mapping[Key, float] | None = None, epochs: int | None = None,
         datasets: Sequence[str] | None = None, **overrides: Any) -> dict[Key, TrainConfig]:
    """The runs of Papyan et al.'s experiment at ``scale`` ("quick", "medium" or "paper"), keyed by (dataset, network).

    lrs: learning rate per key (e.g. from :func:`nc_lib.train.lr_sweep`); otherwise :data:`DEFAULT_LR`
    at paper scale and the network's rate in :data:`QUICK_NETWORKS` at quick scale. epochs: override the number of epochs
    (measurement epochs and lr milestones are rescaled with it). datasets: keep only these datasets.
    overrides: any other TrainConfig field, for every run (e.g. ``device="cpu"``). At paper scale the runs train
    with bfloat16 autocast on a GPU (``amp=True``; every measurement is float32); ``amp=False`` is Papyan's
    float32 training. Quick and medium keep float32.
    """
    scale = check_choice("scale", scale, SCALES)
    lrs = dict(lrs or {})
    if epochs is not None:
        epochs = check_int("epochs", epochs, 1)
    out: dict[Key, TrainConfig] = {}
    if scale == "medium":
        E = epochs or 350
        per_class, test_per_class = MEDIUM_PER_CLASS
        for net, (width, kw) in MEDIUM_NETWORKS.items():
            cfg = dict(per_class=per_class, test_per_class=test_per_class, width=width, model_kwargs=dict(kw),
                       tag="papyan2020-medium", snapshot_per_class=20, precise_bn=True,
                       measure_epochs=PAPYAN_EPOCHS if E == 350 else papyan_measure_epochs(E))
            cfg.update(overrides)
            out[("fashionmnist", net)] = papyan_preset("fashionmnist", net, epochs=E,
                                                       lr=float(lrs.get(("fashionmnist", net), DEFAULT_LR)), **cfg)
        return out
    if scale == "paper":
        keep = list(PAPER_NETWORKS) if datasets is None else [check_choice("datasets", d, list(PAPER_NETWORKS))
                                                              for d in datasets]
        for ds in keep:
            E = epochs or PAPER_EPOCHS[ds]
            for net in PAPER_NETWORKS[ds]:
                kw: dict[str, Any] = {}
                if family(net) == "resnet":
                    kw["stem"] = "imagenet" if ds == "imagenet" else "cifar"
                cfg = dict(per_class=PAPER_PER_CLASS.get(ds), model_kwargs=kw, tag="papyan2020", amp=True)
                # his Colab's list of 50 epochs at 350 epochs; rescaled for 300 (ImageNet) or an override
                cfg["measure_epochs"] = PAPYAN_EPOCHS if E == 350 else papyan_measure_epochs(E)
                cfg.update(overrides)
                out[(ds, net)] = papyan_preset(ds, net, epochs=E, lr=float(lrs.get((ds, net), DEFAULT_LR)), **cfg)
        return out
    keep = list(QUICK_DATASETS) if datasets is None else [check_choice("datasets", d, list(QUICK_DATASETS))
                                                         for d in datasets]
    E = epochs or QUICK_EPOCHS
    for ds in keep:
        per_class, test_per_class = QUICK_DATASETS[ds]
        for net, (width, kw, lr) in QUICK_NETWORKS.items():
            cfg = dict(per_class=per_class, test_per_class=test_per_class, width=width, model_kwargs=dict(kw),
                       weight_decay=QUICK_WEIGHT_DECAY, precise_bn=True, tag="papyan2020-quick", snapshot_per_class=20,
                       measure_epochs=PAPYAN_EPOCHS if E == 350 else papyan_measure_epochs(E))
            cfg.update(overrides)
            out[(ds, net)] = papyan_preset(ds, net, epochs=E, lr=float(lrs.get((ds, net), lr)), **cfg)
    return out


def scale_note(scale: str) -> str:
    """What differs from the paper at ``scale`` (for save_figure's ``note``)."""
    scale = check_choice("scale", scale, SCALES)
    if scale == "medium":
        return (f"medium scale: Papyan's protocol (350 epochs, SGD momentum 0.9, wd 5e-4, batch 128, lr x0.1 at 1/3 and "
                f"2/3, his 50 measurement epochs, no augmentation, lr {DEFAULT_LR} from his Colab, no sweep) on "
                f"Fashion-MNIST with {MEDIUM_PER_CLASS[0]} training images per class instead of 6000; VGG11 at width 1/4, "
                "ResNet18 at width 1/2 and DenseNet-BC-40 at width 1 (instead of DenseNet250), both with the ImageNet stem; "
                "batch-norm statistics recomputed from the training set before each measurement (24 steps per epoch "
                "leave the running averages behind).")
    if scale == "paper":
        return ("Paper protocol (7 datasets x 3 networks, 350 epochs / 300 ImageNet, Papyan's subsets and measurement "
                "epochs); network depth per dataset is the likely assignment of REFERENCE section 3 (unconfirmed); "
                f"lr {DEFAULT_LR} (the authors' Colab) unless a sweep result was given.")
    (ds, (pc, tpc)), = QUICK_DATASETS.items()
    widths = ", ".join(f"{network_label(n)} at width {_fraction(w)}" for n, (w, _, _) in QUICK_NETWORKS.items())
    lrs = sorted({lr for _, _, lr in QUICK_NETWORKS.values()})
    return (f"quick scale: Papyan's protocol (350 epochs, SGD momentum 0.9, batch 128, lr x0.1 at 116 and 233, his 50 "
            f"measurement epochs, no augmentation) on {DATASET_NAMES[ds]} with {pc} training and {tpc} test images per "
            f"class instead of 6000 and 1000; {widths} (DenseNet-BC-40 instead of DenseNet250, ImageNet stem on ResNet "
            f"and DenseNet); weight decay {QUICK_WEIGHT_DECAY:g} instead of 5e-4; lr {', '.join(f'{x:g}' for x in lrs)} "
            "picked by hand instead of a 25-value sweep; batch-norm statistics recomputed from the training set "
            "before each measurement (2 steps per epoch leave the running averages behind); one dataset instead "
            "of seven.")


def _fraction(width: float) -> str:
    """0.125 -> '1/8', 1.0 -> '1'."""
    from fractions import Fraction
    f = Fraction(width).limit_denominator(64)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
