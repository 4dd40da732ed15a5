"""Zhu et al. (2021)'s experiment grids: the configuration of every run of the four experiments, per scale.

The four experiments (each a dict label -> :class:`~nc_lib.config.TrainConfig`, see :func:`grid`):

1. ``fig3`` optimisers (CIFAR10; ``fig3_mnist`` MNIST): ResNet18 with the ImageNet stem, no
   augmentation, 200 epochs, weight decay 5e-4. SGD lr 0.05, momentum 0.9, batch 128; Adam lr 1e-3
   (CIFAR10) / 1e-4 (MNIST), batch 128 (the paper says 64-128; 128 is their code's default); both
   lr x0.1 every 40 epochs. LBFGS lr 0.1, history 10, strong Wolfe line search, batch 2048, weight
   decay added to the loss, constant lr (the reference gives no schedule for LBFGS).
   (Their released Adam arguments say lr 1e-4 and gamma 0.2 for CIFAR10 too; we follow the paper.)
2. ``fig4`` validity of the UFM: CIFAR10 with random labels, SGD lr 0.01, batch 64, weight decay
   1e-4, 200 epochs, lr x0.1 every 40 epochs (the schedule is the code's default, assumed);
   MLPs (Linear-BN-ReLU) of widths 512/1024/2048 at depth 6 and of depths 1/3/6/9 at width 2048,
   ResNet18 (CIFAR stem, as in the authors' ``res_adapt.py``) of widths 0.25/0.5/1/2 (first-layer
   channels k = 16/32/64/128). The exact widths and depths could not be confirmed from the paper:
   this is the best-supported reading (their MLP's default depth is 6).
3. ``fig5`` weight decay on the network (5e-4 on every parameter) versus on the features:
   lambda_H = 5e-4 on the *raw* penultimate features (``TrainConfig.feature_decay``: loss +
   lambda_H/2 mean_i ||h_i||^2) and lambda_W = 5e-4 on the classifier only, no decay on the body.
   The authors' code penalised the normalised features h/||h||, whose norm is 1: that penalty is
   a constant with zero gradient. Same SGD protocol as ``fig3``. lambda_H is not given in the
   reference; 5e-4 (equal to the network's decay) is our choice.
4. ``fig6`` fixed ETF classifier x feature dimension on CIFAR10: ResNet18 with the CIFAR stem,
   crop + flip augmentation, SGD as in ``fig3``; learned W (``linear``) or fixed simplex ETF W
   (``fixed_etf``: the canonical ETF in the first C coordinates, frozen, learned bias), d = 512 or
   d = C (``feature_dim=C`` narrows the last block of layer4 to C channels with a 1x1-conv
   shortcut). ``fig6_resnet50``: ResNet50, d = 2048 versus d = C.

At ``quick`` scale everything runs on two CPU cores in a few minutes: offline datasets (scikit-learn
digits, MNIST-1D, and their random-label versions), small widths and few epochs, the lr schedule
(x0.1 every 40 of 200 epochs) replaced by x0.1 every epochs/3 (rescaling 40/200 to a dozen epochs
leaves two epochs at the full lr and training stalls). What differs is stated in
:func:`note`.

Every number that sets the size of a scale is here, in :func:`paper_grid` and :func:`quick_grid`.
"""
from __future__ import annotations

from typing import Any

from ...config import TrainConfig
from ...validation import check_choice

SCALES = ("quick", "paper")
EXPERIMENTS = ("fig3", "fig3_mnist", "fig4", "fig5", "fig6", "fig6_resnet50")

#: the four variants of the fixed-classifier experiment, in table order
FIXED_VARIANTS = ("learned W, d = wide", "fixed W, d = wide", "learned W, d = C", "fixed W, d = C")


def _paper_sgd(dataset: str, **kw: Any) -> TrainConfig:
    base = dict(dataset=dataset, model="resnet18", model_kwargs={"stem": "imagenet"}, augment=False,
                optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=200,
                schedule="step", step_size=40, gamma=0.1, tag="zhu2021")
    base.update(kw)
    return TrainConfig(**base)


def _optimiser_grid(dataset: str, adam_lr: float, **common: Any) -> dict[str, TrainConfig]:
    sgd = _paper_sgd(dataset, **common)
    return {
        "SGD": sgd,
        "Adam": sgd.replace(optimizer="adam", lr=adam_lr),
        "LBFGS": sgd.replace(optimizer="lbfgs", lr=0.1, lbfgs_history=10, batch_size=2048, schedule="none"),
    }


def paper_grid() -> dict[str, dict[str, TrainConfig]]:
    """The paper's settings, exactly where the reference gives them (see the module docstring)."""
    fig3 = _optimiser_grid("cifar10", 1e-3)
    fig3_mnist = _optimiser_grid("mnist", 1e-4)
    rl = dict(dataset="cifar10", random_labels=True, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4,
              batch_size=64, epochs=200, schedule="step", step_size=40, gamma=0.1, augment=False, tag="zhu2021")
    fig4: dict[str, TrainConfig] = {}
    for w in (512, 1024, 2048):
        fig4[f"MLP width {w}, depth 6"] = TrainConfig(model="mlp", model_kwargs={"hidden": w, "depth": 6}, **rl)
    for dp in (1, 3, 9):  # depth 6 at width 2048 is already in the width sweep
        fig4[f"MLP width 2048, depth {dp}"] = TrainConfig(model="mlp", model_kwargs={"hidden": 2048, "depth": dp}, **rl)
    for w in (0.25, 0.5, 1.0, 2.0):
        fig4[f"ResNet18 width {w:g}"] = TrainConfig(model="resnet18", width=w, model_kwargs={"stem": "cifar"}, **rl)
    net = _paper_sgd("cifar10")
    fig5 = {"weight decay on the network": net,
            "weight decay on the features": net.replace(weight_decay=0.0, head_weight_decay=5e-4, feature_decay=5e-4)}
    fig6 = _fixed_grid(_paper_sgd("cifar10", model_kwargs={"stem": "cifar"}, augment=True), 512, 10)
    fig6_r50 = _fixed_grid(_paper_sgd("cifar10", model="resnet50", model_kwargs={"stem": "cifar"}, augment=True), 2048, 10)
    return {"fig3": fig3, "fig3_mnist": fig3_mnist, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig6_resnet50": fig6_r50}


def _fixed_grid(base: TrainConfig, d_wide: int | None, C: int) -> dict[str, TrainConfig]:
    """learned / fixed W x d = wide / C. ``d_wide=None`` keeps the network's own width."""
    out = {}
    for label in FIXED_VARIANTS:
        head = "fixed_etf" if label.startswith("fixed") else "linear"
        d = C if label.endswith("= C") else d_wide
        out[label] = base.replace(head=head, feature_dim=d)
    return out


def quick_grid() -> dict[str, dict[str, TrainConfig]]:
    """Offline stand-ins that run in minutes on two CPU cores (see :func:`note`)."""
    q = dict(tag="zhu2021-quick", device="cpu", snapshot_per_class=0)
    mlp = dict(model="mlp", model_kwargs={"hidden": 256, "depth": 3})
    epochs = 12

    def optimisers(dataset: str, adam_lr: float, per_class: int | None, lbfgs_batch: int) -> dict[str, TrainConfig]:
        sgd = TrainConfig(dataset=dataset, per_class=per_class, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                          batch_size=128, epochs=epochs, schedule="step", step_size=max(1, epochs // 3),
                          gamma=0.1, augment=False, **mlp, **q)
        return {"SGD": sgd, "Adam": sgd.replace(optimizer="adam", lr=adam_lr),
                "LBFGS": sgd.replace(optimizer="lbfgs", lr=0.1, lbfgs_history=10, batch_size=lbfgs_batch,
                                     schedule="none")}

    # LBFGS batch 2048 is larger than the quick sets: full batch on digits, 2048 of MNIST-1D's 4000
    fig3 = optimisers("digits", 1e-3, None, 2048)
    fig3_mnist = optimisers("mnist1d", 1e-4, 200, 2048)

    rl_epochs = 30
    rl = dict(dataset="digits", per_class=50, random_labels=True, optimizer="sgd", lr=0.01, momentum=0.9,
              weight_decay=1e-4, batch_size=64, epochs=rl_epochs, schedule="step",
              step_size=max(1, rl_epochs // 3), gamma=0.1, augment=False,
              measure_epochs=tuple(range(2, rl_epochs + 1, 2)), **q)
    fig4: dict[str, TrainConfig] = {}
    for w in (32, 128, 512):
        fig4[f"MLP width {w}, depth 3"] = TrainConfig(model="mlp", model_kwargs={"hidden": w, "depth": 3}, **rl)
    for dp in (1, 6):
        fig4[f"MLP width 128, depth {dp}"] = TrainConfig(model="mlp", model_kwargs={"hidden": 128, "depth": dp}, **rl)
    for w in (0.125, 0.25):
        fig4[f"ResNet18 width {w:g}"] = TrainConfig(model="resnet18", width=w, model_kwargs={"stem": "imagenet"}, **rl)

    r_epochs = 12
    res = TrainConfig(dataset="digits", per_class=100, model="resnet18", width=0.125, model_kwargs={"stem": "cifar"},
                      optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=r_epochs,
                      schedule="step", step_size=max(1, r_epochs // 3), gamma=0.1, augment=False, **q)
    net = fig3["SGD"]
    fig5 = {"weight decay on the network": net,
            "weight decay on the features": net.replace(weight_decay=0.0, head_weight_decay=5e-4, feature_decay=5e-4)}
    fig6 = _fixed_grid(res, 512, 10)
    # a small stand-in for ResNet50 (d = 2048 vs C): an MLP whose last hidden layer is 512 wide or C
    fig6_r50 = _fixed_grid(fig3["SGD"].replace(model_kwargs={"hidden": 512, "depth": 3}), None, 10)
    return {"fig3": fig3, "fig3_mnist": fig3_mnist, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig6_resnet50": fig6_r50}


def grid(scale: str = "quick") -> dict[str, dict[str, TrainConfig]]:
    """Experiment name (one of :data:`EXPERIMENTS`) -> {curve label -> TrainConfig} at ``scale``."""
    check_choice("scale", scale, SCALES)
    return paper_grid() if scale == "paper" else quick_grid()


def note(experiment: str, scale: str) -> str:
    """What differs from the paper at ``scale`` (for ``save_figure(..., note=...)``)."""
    check_choice("experiment", experiment, EXPERIMENTS + ("table1",))
    check_choice("scale", scale, SCALES)
    if scale == "paper":
        extra = {
            "fig4": " MLP widths/depths and ResNet18 widths are our best reading of the paper (unconfirmed).",
            "fig5": " lambda_H = 5e-4 on the raw features (the authors' code penalised normalised features, zero gradient).",
            "fig6_resnet50": "",
            "table1": " Memory is measured (the authors only counted parameters).",
        }.get(experiment, "")
        return "The paper's settings." + extra
    lr = "lr x0.1 every epochs/3 instead of every 40 of 200 epochs (a rescaled 1/5 stops training too early)"
    return {
        "fig3": "Quick: MLP (3 x 256, BN) on scikit-learn digits instead of ResNet18 on CIFAR10, 12 epochs, " + lr +
                "; LBFGS at full batch (1497 < 2048).",
        "fig3_mnist": "Quick: MNIST-1D instead of MNIST, MLP (3 x 256, BN) instead of ResNet18, 12 epochs, " + lr + ".",
        "fig4": "Quick: digits with random labels (50 per class) instead of CIFAR10, MLP widths 32/128/512 (depth 3) and "
                "depths 1/3/6 (width 128), ResNet18 widths 1/8 and 1/4 (ImageNet stem), 30 epochs, measured every 2, " + lr + ".",
        "fig5": "Quick: MLP (3 x 256, BN) on digits instead of ResNet18 on CIFAR10, 12 epochs, " + lr + ".",
        "fig6": "Quick: ResNet18 at width 1/8 (CIFAR stem) on digits (100 per class), no augmentation (8x8 images), "
                "12 epochs, " + lr + "; d = 512 is reached by widening the last block of layer4 (feature_dim=512), "
                "d = C by narrowing it.",
        "fig6_resnet50": "Quick: a small stand-in for ResNet50 (d = 2048 vs C): an MLP (3 x 512, BN) on digits whose last "
                         "hidden layer is d = 512 ('wide') or d = C = 10; 12 epochs, " + lr + ".",
        "table1": "Quick: the four fig6 stand-ins (ResNet18 width 1/8 on digits, d = 512 by widening the last block); "
                  "memory on the CPU as the peak resident set (VmHWM) of a fresh process per variant over 3 training "
                  "steps, minus its resident set before the model was built.",
    }[experiment]
