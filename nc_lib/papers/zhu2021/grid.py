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

Three scales (:data:`nc_lib.validation.SCALES`), each a function of this module:

- ``paper`` (:func:`paper_grid`): the settings above.
- ``medium`` (:func:`medium_grid`): the paper's protocol (epochs 200, batches, optimisers, lrs and
  schedules, weight decays, augmentation) on Fashion-MNIST, which stands for CIFAR10 and for MNIST
  (both offline-unavailable), sized like Papyan's medium grid (the dry run prices it at 1.8 CPU hours
  on the 2-core machine that prices Papyan's at 1.3): the per-class count (:data:`MEDIUM_PER_CLASS`,
  random labels :data:`MEDIUM_RL_PER_CLASS`, test set whole), ResNet18 and MLP widths x
  :data:`MEDIUM_WIDTH`, ResNet50 x :data:`MEDIUM_RESNET50_WIDTH` (the fixed-classifier experiment keeps
  d = 512 / 2048 against d = C through ``feature_dim``), the ImageNet stem for every ResNet
  (:data:`MEDIUM_STEM`), measurements every :data:`MEDIUM_MEASURE_EVERY` epochs, LBFGS
  :data:`MEDIUM_LBFGS_EPOCHS` epochs of one full-batch step each (batch-norm statistics recomputed before each
  LBFGS measurement, ``precise_bn``, at quick and medium scale), and no augmentation in fig6
  (:data:`MEDIUM_AUGMENT`: with it the narrow network never fits its training set).
- ``quick`` (:func:`quick_grid`): Fashion-MNIST on two CPU cores in about three minutes: ResNet18 at
  width 1/8 with the ImageNet stem (28 -> 7 pixels after the stem; the CIFAR stem is 10x slower),
  ResNet50 at width 1/16, :data:`QUICK_PER_CLASS` images per class, :data:`QUICK_EPOCHS` epochs (LBFGS
  :data:`QUICK_LBFGS_EPOCHS`), lr x0.1 every epochs/3 (rescaling 40/200 leaves two epochs at the full lr
  and training stalls), measured every 3 epochs;
  random labels on MLPs and ResNets of 50 per class. What differs is stated in :func:`note`.

Every number that sets the size of a scale is here.
"""
from __future__ import annotations

from typing import Any

from ...config import TrainConfig, grid_amp
from ...validation import SCALES, check_choice, check_scale

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


#: quick scale: Fashion-MNIST images per class (train; test), epochs, ResNet18 width (1/8: d = 64)
QUICK_PER_CLASS = 100
QUICK_TEST_PER_CLASS = 300
QUICK_EPOCHS = 24
#: quick LBFGS: epochs (each one full-batch step of up to 20 iterations, the cost of about 20 SGD epochs)
QUICK_LBFGS_EPOCHS = 4
#: quick ResNet50 (fig6_resnet50) width: d = 128 of its own
QUICK_RESNET50_WIDTH = 0.0625
QUICK_RESNET_WIDTH = 0.125
#: quick random-label experiment (Fig. 4): images per class and epochs
QUICK_RL_PER_CLASS = 50
QUICK_RL_EPOCHS = 30
#: quick random-label MLPs: the widths at depth 3, and the width of the depth sweep (2048 took 76 of the 100 s of Fig. 4)
QUICK_RL_WIDTHS = (128, 512, 1024)
QUICK_RL_DEPTH_WIDTH = 1024
#: medium scale: Fashion-MNIST images per class (test set whole) and the factor on every width
MEDIUM_PER_CLASS = 200
MEDIUM_WIDTH = 0.25
#: medium ResNet50 (fig6_resnet50): its width factor (d = 128 of its own, widened to 2048 or narrowed to C)
MEDIUM_RESNET50_WIDTH = 0.0625
#: medium random labels (fig4): images per class (memorising random labels costs more epochs per image)
MEDIUM_RL_PER_CLASS = 100
#: medium augmentation: none. With the paper's crop + flip (fig6) the width-0.25 ResNet18 ended 200 epochs at 92.4%
#: training accuracy (learned W, d = 512; NC1 0.56): it never reaches the terminal phase the figure is about
MEDIUM_AUGMENT = False
#: medium LBFGS: epochs. With 2,000 images its batch of 2048 is the whole set, so an epoch is one step of up
#: to 20 function evaluations, about 15 SGD epochs of compute: 200 of them would be half the grid's time
MEDIUM_LBFGS_EPOCHS = 40
#: medium: every ResNet takes the ImageNet stem (28 -> 7 pixels; the CIFAR stem keeps 28 x 28 maps through
#: layer1 and is about 8x slower, which made the grid 20 CPU hours) and runs are measured every few epochs
MEDIUM_STEM = "imagenet"
MEDIUM_MEASURE_EVERY = 5


def quick_grid() -> dict[str, dict[str, TrainConfig]]:
    """Fashion-MNIST, minutes on two CPU cores (see the module docstring and :func:`note`)."""
    q = dict(tag="zhu2021-quick", device="cpu", snapshot_per_class=0, dataset="fashionmnist")
    epochs = QUICK_EPOCHS
    every3 = tuple(range(3, epochs + 1, 3))
    res = dict(model="resnet18", width=QUICK_RESNET_WIDTH, model_kwargs={"stem": "imagenet"})
    sgd = TrainConfig(per_class=QUICK_PER_CLASS, test_per_class=QUICK_TEST_PER_CLASS, optimizer="sgd", lr=0.05,
                      momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=epochs, schedule="step",
                      step_size=max(1, epochs // 3), gamma=0.1, augment=False, measure_epochs=every3, **res, **q)

    def optimisers(adam_lr: float) -> dict[str, TrainConfig]:
        # LBFGS batch 2048 is larger than the quick training set: full batch
        return {"SGD": sgd, "Adam": sgd.replace(optimizer="adam", lr=adam_lr),
                "LBFGS": sgd.replace(optimizer="lbfgs", lr=0.1, lbfgs_history=10, batch_size=2048, schedule="none",
                                     epochs=QUICK_LBFGS_EPOCHS, measure_epochs=None, precise_bn=True)}

    # Fashion-MNIST stands for both CIFAR10 and MNIST: SGD and LBFGS are the same runs, only Adam's lr differs
    fig3 = optimisers(1e-3)
    fig3_mnist = optimisers(1e-4)

    rl_epochs = QUICK_RL_EPOCHS
    rl = dict(per_class=QUICK_RL_PER_CLASS, test_per_class=QUICK_RL_PER_CLASS, random_labels=True, optimizer="sgd",
              lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=64, epochs=rl_epochs, schedule="step",
              step_size=max(1, rl_epochs // 3), gamma=0.1, augment=False,
              measure_epochs=tuple(range(3, rl_epochs + 1, 3)), **q)
    fig4: dict[str, TrainConfig] = {}
    for w in QUICK_RL_WIDTHS:
        fig4[f"MLP width {w}, depth 3"] = TrainConfig(model="mlp", model_kwargs={"hidden": w, "depth": 3}, **rl)
    dw = QUICK_RL_DEPTH_WIDTH
    for dp in (1, 6):
        fig4[f"MLP width {dw}, depth {dp}"] = TrainConfig(model="mlp", model_kwargs={"hidden": dw, "depth": dp}, **rl)
    for w in (0.125, 0.25):
        fig4[f"ResNet18 width {w:g}"] = TrainConfig(model="resnet18", width=w, model_kwargs={"stem": "imagenet"}, **rl)

    fig5 = {"weight decay on the network": sgd,
            "weight decay on the features": sgd.replace(weight_decay=0.0, head_weight_decay=5e-4, feature_decay=5e-4)}
    fig6 = _fixed_grid(sgd, 512, 10)
    # ResNet50 at width 1/16 (d = 128 of its own), widened to d = 2048 as the paper's, or narrowed to C
    fig6_r50 = _fixed_grid(sgd.replace(model="resnet50", width=QUICK_RESNET50_WIDTH), 2048, 10)
    return {"fig3": fig3, "fig3_mnist": fig3_mnist, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig6_resnet50": fig6_r50}


def medium_grid() -> dict[str, dict[str, TrainConfig]]:
    """The paper's protocol on Fashion-MNIST, sized for a laptop (see the module docstring).

    Every configuration of :func:`paper_grid` with ``dataset="fashionmnist"`` (for CIFAR10 and MNIST),
    ``per_class=MEDIUM_PER_CLASS`` (:data:`MEDIUM_RL_PER_CLASS` with random labels), ResNet18 widths and
    MLP ``hidden`` x :data:`MEDIUM_WIDTH`, ResNet50 widths x :data:`MEDIUM_RESNET50_WIDTH`, every ResNet
    with the :data:`MEDIUM_STEM` stem, measured every :data:`MEDIUM_MEASURE_EVERY` epochs, LBFGS for
    :data:`MEDIUM_LBFGS_EPOCHS` epochs; ``feature_dim`` (d = 512, 2048 or C) kept; device ``auto``."""
    def reduce(cfg: TrainConfig) -> TrainConfig:
        kw: dict[str, Any] = dict(dataset="fashionmnist", tag="zhu2021-medium",
                                  per_class=MEDIUM_RL_PER_CLASS if cfg.random_labels else MEDIUM_PER_CLASS)
        epochs = MEDIUM_LBFGS_EPOCHS if cfg.optimizer == "lbfgs" else cfg.epochs
        kw["epochs"] = epochs
        # LBFGS's line search runs the network in training mode at trial points: the batch-norm running averages
        # follow those, not the accepted weights (measured: 90.3% training accuracy at epoch 40 with them, 100%
        # with the statistics recomputed); recompute them before each measurement (as the quick grid does)
        kw["precise_bn"] = cfg.optimizer == "lbfgs"
        if cfg.model == "mlp":
            kw["model_kwargs"] = {**cfg.model_kwargs, "hidden": int(cfg.model_kwargs["hidden"] * MEDIUM_WIDTH)}
        else:
            kw["width"] = cfg.width * (MEDIUM_RESNET50_WIDTH if cfg.model == "resnet50" else MEDIUM_WIDTH)
            kw["model_kwargs"] = {**cfg.model_kwargs, "stem": MEDIUM_STEM}
        kw["measure_epochs"] = tuple(range(MEDIUM_MEASURE_EVERY, epochs + 1, MEDIUM_MEASURE_EVERY))
        kw["augment"] = cfg.augment and MEDIUM_AUGMENT
        return cfg.replace(**kw)

    out = {exp: {label: reduce(cfg) for label, cfg in configs.items()} for exp, configs in paper_grid().items()}
    # relabel the width sweeps with the widths that run
    out["fig4"] = {_medium_label(label, cfg): cfg for label, cfg in out["fig4"].items()}
    return out


def _medium_label(label: str, cfg: TrainConfig) -> str:
    if cfg.model == "mlp":
        return f"MLP width {cfg.model_kwargs['hidden']}, depth {cfg.model_kwargs['depth']}"
    return f"ResNet18 width {cfg.width:g}"


def grid(scale: str = "quick", *, amp: bool | None = None) -> dict[str, dict[str, TrainConfig]]:
    """Experiment name (one of :data:`EXPERIMENTS`) -> {curve label -> TrainConfig} at ``scale``
    (one of :data:`nc_lib.validation.SCALES`). ``amp``: bfloat16 autocast of the training passes on a GPU
    (:func:`nc_lib.config.grid_amp`: on at paper scale unless ``amp=False``, the paper's float32)."""
    check_scale(scale)
    out = {"quick": quick_grid, "medium": medium_grid, "paper": paper_grid}[scale]()
    if grid_amp(scale, amp):
        out = {exp: {label: c.replace(amp=True) for label, c in runs.items()} for exp, runs in out.items()}
    return out


def note(experiment: str, scale: str) -> str:
    """What differs from the paper at ``scale`` (for ``save_figure(..., note=...)``). The measured gap
    between the fixed and the learned classifier is added by :func:`nc_lib.papers.zhu2021.figures.fixed_gap_note`."""
    check_choice("experiment", experiment, EXPERIMENTS + ("table1",))
    check_scale(scale)
    if scale == "paper":
        extra = {
            "fig4": " MLP widths/depths and ResNet18 widths are our best reading of the paper (unconfirmed).",
            "fig5": " lambda_H = 5e-4 on the raw features (the authors' code penalised normalised features, zero gradient).",
            "fig6_resnet50": "",
            "table1": " Memory is measured (the authors only counted parameters).",
        }.get(experiment, "")
        return "The paper's settings." + extra
    if scale == "medium":
        data = {"fig3_mnist": "MNIST", "fig4": "CIFAR10 with random labels"}.get(experiment, "CIFAR10")
        per_class = MEDIUM_RL_PER_CLASS if experiment == "fig4" else MEDIUM_PER_CLASS
        widths = {"fig4": f"MLP widths {', '.join(str(int(w * MEDIUM_WIDTH)) for w in (512, 1024, 2048))} "
                          f"(paper 512/1024/2048), ResNet18 widths "
                          f"{', '.join(f'{w * MEDIUM_WIDTH:g}' for w in (0.25, 0.5, 1.0, 2.0))} (paper 0.25, 0.5, 1, 2)",
                  "fig6_resnet50": f"ResNet50 at width x{MEDIUM_RESNET50_WIDTH:g}, d = 2048 and d = C kept through "
                                   "the last block",
                  "fig6": f"ResNet18 at width x{MEDIUM_WIDTH:g}, d = 512 and d = C kept through the last block",
                  "table1": f"ResNet18 at width x{MEDIUM_WIDTH:g}, d = 512 against d = C"}.get(
            experiment, f"ResNet18 at width x{MEDIUM_WIDTH:g}")
        lbfgs = (f"; LBFGS {MEDIUM_LBFGS_EPOCHS} epochs instead of 200, each one full-batch step (2,000 images < 2048), "
                 "batch-norm statistics recomputed from the training set before each LBFGS measurement (the line "
                 "search's trial points pollute the running averages)"
                 if experiment in ("fig3", "fig3_mnist") else "")
        aug = (f"; no augmentation (the paper: crop + flip; with it the width-{MEDIUM_WIDTH:g} ResNet18 of fig6 ended at "
               "92% training accuracy)"
               if experiment in ("fig6", "fig6_resnet50", "table1") and not MEDIUM_AUGMENT else "")
        return (f"Medium: the paper's protocol (200 epochs, its batch, optimiser, lr and schedule, weight decay) "
                f"on Fashion-MNIST with {per_class} images per class (full test set) instead of "
                f"{data}; {widths}; the ImageNet stem on every ResNet (28 -> 7 pixels; the paper's CIFAR stem on fig4 "
                f"and fig6){aug}; measured every {MEDIUM_MEASURE_EVERY} epochs{lbfgs}."
                + (" Memory is measured (the authors only counted parameters)." if experiment == "table1" else ""))
    P, T, E, w = QUICK_PER_CLASS, QUICK_TEST_PER_CLASS, QUICK_EPOCHS, QUICK_RESNET_WIDTH
    base = (f"Quick: Fashion-MNIST ({P} training, {T} test images per class) instead of {{data}}, ResNet18 at width "
            f"{w:g} (d = {int(512 * w)}) with the ImageNet stem, {E} epochs instead of 200, lr 0.05 x0.1 every {E // 3} "
            f"epochs instead of every 40, measured every 3 epochs")
    rl = (f"Quick: Fashion-MNIST with random labels ({QUICK_RL_PER_CLASS} per class) instead of CIFAR10; MLPs of widths "
          f"{'/'.join(map(str, QUICK_RL_WIDTHS))} at depth 3 and of depths 1/3/6 at width {QUICK_RL_DEPTH_WIDTH} "
          f"(paper: widths 512-2048 at depth 6, depths 1-9), "
          f"ResNet18 widths 1/8 and 1/4 with the ImageNet stem (paper 0.25-2, CIFAR stem); {QUICK_RL_EPOCHS} epochs "
          f"instead of 200, lr 0.01 x0.1 every {QUICK_RL_EPOCHS // 3} epochs instead of every 40, measured every 3.")
    return {
        "fig3": base.format(data="CIFAR10") + f"; LBFGS at full batch ({10 * P} < 2048), one step of up to 20 "
                f"iterations per epoch, {QUICK_LBFGS_EPOCHS} epochs, batch-norm statistics recomputed from the training set "
                "before each LBFGS measurement (the line search's trial points pollute the running averages).",
        "fig3_mnist": base.format(data="MNIST") + " (the same SGD and LBFGS runs as fig3: only Adam's lr, 1e-4, "
                                                  f"differs); LBFGS at full batch, {QUICK_LBFGS_EPOCHS} epochs, batch-norm "
                                                  "statistics recomputed before each LBFGS measurement.",
        "fig4": rl,
        "fig5": base.format(data="CIFAR10") + "; lambda_H = lambda_W = 5e-4.",
        "fig6": base.format(data="CIFAR10") + "; the paper's fig6 uses the CIFAR stem and crop + flip augmentation, "
                "here no augmentation; d = 512 by widening the last block of layer4 (feature_dim=512), d = C by "
                "narrowing it.",
        "fig6_resnet50": base.format(data="CIFAR10").replace(f"ResNet18 at width {w:g} (d = {int(512 * w)})",
                                                             f"ResNet50 at width {QUICK_RESNET50_WIDTH:g} "
                                                             f"(d = {int(2048 * QUICK_RESNET50_WIDTH)})")
                         + ", no augmentation; d = 2048 by widening the last block (feature_dim=2048), d = C by "
                           "narrowing it.",
        "table1": f"Quick: the four fig6 variants (ResNet18 width {w:g}, ImageNet stem, on Fashion-MNIST, d = 512 by "
                  "widening the last block against d = C); memory on the CPU as the peak resident set (VmHWM) of a "
                  "fresh process per variant over the measured training steps, minus its resident set before the "
                  "model was built.",
    }[experiment]
