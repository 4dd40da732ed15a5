"""Zhu et al. (2021), "A Geometric Analysis of Neural Collapse with Unconstrained Features": the
deep-network experiments (REFERENCE.md sections 2, 3 and 5), as options of the training engine.

Measurements (Zhu's definitions, :data:`nc_lib.metrics.PAPER_NAMES` ``["zhu2021"]``), at every epoch:

- NC1 = Tr(Sigma_W Sigma_B^+)/C                                    (``within_class_variability``)
- NC2 = || W W^T/||W W^T||_F - (I - 11^T/C)/sqrt(C-1) ||_F, W uncentred (``classifier_etf_distance``;
  on the centred class means ``means_etf_distance``, used in the fixed-classifier figures, where
  the classifier is an exact ETF by construction and its NC2 is 0 at every epoch)
- NC3 = || W Mdot/||W Mdot||_F - (I - 11^T/C)/sqrt(C-1) ||_F        (``classifier_means_alignment``)
- NC4 = || W mu_G + b ||_2                                         (``bias_offset_norm``)

The four experiments (each a dict label -> :class:`~nc_lib.train.TrainConfig`, see :func:`grid`):

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

:func:`table1` measures, for the four ``fig6`` variants, trainable parameters, the peak training
memory at the configured batch and the parameter + gradient + optimiser-state bytes
(:func:`measure_training_memory`), with the final test accuracy of the trained runs.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..metrics import PAPER_NAMES
from ..models import count_parameters
from ..train import RunResult, TrainConfig, train
from ..validation import check_choice, check_int

SCALES = ("quick", "paper")
EXPERIMENTS = ("fig3", "fig3_mnist", "fig4", "fig5", "fig6", "fig6_resnet50")

#: the six panels of Zhu's Figures 3-6: record key -> panel title
PANELS: dict[str, str] = {
    PAPER_NAMES["zhu2021"]["NC1"]: "NC1: Tr(Σ_W Σ_B⁺)/C",
    PAPER_NAMES["zhu2021"]["NC2"]: "NC2: classifier W vs ETF",
    PAPER_NAMES["zhu2021"]["NC3"]: "NC3: W vs centred means",
    PAPER_NAMES["zhu2021"]["NC4"]: "NC4: ‖W μ_G + b‖",
    "train_accuracy": "training accuracy",
    "test_accuracy": "test accuracy",
}
#: fixed-classifier figures: NC2 on the centred class means (W is an exact ETF by construction)
PANELS_FIXED: dict[str, str] = {PAPER_NAMES["zhu2021"]["NC1"]: PANELS[PAPER_NAMES["zhu2021"]["NC1"]],
                PAPER_NAMES["zhu2021"]["NC2 (means)"]: "NC2: centred class means vs ETF",
                **{k: v for k, v in PANELS.items() if k not in (PAPER_NAMES["zhu2021"]["NC1"], PAPER_NAMES["zhu2021"]["NC2"])}}

#: what each experiment is drawn as
FIGURE_IDS = {"fig3": "zhu2021_fig3", "fig3_mnist": "zhu2021_fig3_mnist", "fig4": "zhu2021_fig4",
              "fig5": "zhu2021_fig5", "fig6": "zhu2021_fig6", "fig6_resnet50": "zhu2021_fig6_resnet50"}

#: the four variants of the fixed-classifier experiment, in table order
FIXED_VARIANTS = ("learned W, d = wide", "fixed W, d = wide", "learned W, d = C", "fixed W, d = C")


# ----------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def run_grid(configs: Mapping[str, TrainConfig], *, progress: bool = False) -> dict[str, RunResult]:
    """Train every configuration (a finished run is loaded, not retrained)."""
    return {label: train(cfg, progress=progress) for label, cfg in configs.items()}


def run_experiment(experiment: str, scale: str = "quick", *, progress: bool = False) -> dict[str, RunResult]:
    """Train (or load) one experiment of :func:`grid`."""
    check_choice("experiment", experiment, EXPERIMENTS)
    return run_grid(grid(scale)[experiment], progress=progress)


def run_optimisers(scale: str = "quick", mnist: bool = False, **kw: Any) -> dict[str, RunResult]:
    """Experiment 1: SGD / Adam / LBFGS (``mnist=True``: the appendix version)."""
    return run_experiment("fig3_mnist" if mnist else "fig3", scale, **kw)


def run_ufm_validity(scale: str = "quick", **kw: Any) -> dict[str, RunResult]:
    """Experiment 2: random labels, MLP widths/depths and ResNet18 widths."""
    return run_experiment("fig4", scale, **kw)


def run_feature_decay(scale: str = "quick", **kw: Any) -> dict[str, RunResult]:
    """Experiment 3: weight decay on the network versus on the raw features."""
    return run_experiment("fig5", scale, **kw)


def run_fixed_classifier(scale: str = "quick", resnet50: bool = False, **kw: Any) -> dict[str, RunResult]:
    """Experiment 4: learned / fixed W x d = wide / C (``resnet50=True``: the appendix version)."""
    return run_experiment("fig6_resnet50" if resnet50 else "fig6", scale, **kw)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def figure(results: Mapping[str, RunResult | Sequence[dict[str, Any]]], *, fixed: bool = False,
           title: str | None = None) -> Any:
    """Zhu's six panels (NC1, NC2, NC3, NC4, train accuracy, test accuracy) against epoch, a curve
    per label of ``results`` (RunResults or lists of records). ``fixed=True``: NC2 on the centred
    class means instead of on W (a fixed ETF classifier has NC2 = 0 by construction). NC1 on a log axis."""
    from ..plots import plot_metric_curves

    if not results:
        raise ValueError("results must hold at least one label -> run.")
    panels = PANELS_FIXED if fixed else PANELS
    histories = {label: (r.history if isinstance(r, RunResult) else list(r)) for label, r in results.items()}
    return plot_metric_curves(histories, list(panels), x="epoch", log_y=[PAPER_NAMES["zhu2021"]["NC1"]],
                              titles=panels, cols=3, x_title="epoch", title=title, height=700)


def figure_fig3(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig3`` / ``zhu2021_fig3_mnist``: a curve per optimiser."""
    return figure(results, **kw)


def figure_fig4(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig4``: a curve per network (random labels)."""
    return figure(results, **kw)


def figure_fig5(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig5``: weight decay on the network versus on the features."""
    return figure(results, **kw)


def figure_fig6(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig6`` / ``zhu2021_fig6_resnet50``: learned / fixed W x d = wide / C; NC2 on the means."""
    return figure(results, fixed=True, **kw)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def training_loss(model: nn.Module, x: Tensor, y: Tensor, feature_decay: float = 0.0) -> tuple[Tensor, Tensor]:
    """The engine's per-batch objective: CE(W h + b, y) + lambda_H/2 mean_i ||h_i||^2 on the raw
    features h = body(x) (the same formula as :func:`nc_lib.train.train`). Returns (loss, h)."""
    h = model.body(x)
    loss = nn.functional.cross_entropy(model.head(h), y)
    if feature_decay > 0:
        loss = loss + 0.5 * feature_decay * h.pow(2).sum(1).mean()
    return loss, h


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of trainable parameters, of their gradients and of the optimiser's state tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    g_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    s_bytes = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                  if isinstance(v, Tensor) and v.dim() > 0)
    return {"param_bytes": p_bytes, "grad_bytes": g_bytes, "optimizer_state_bytes": s_bytes,
            "param_grad_state_bytes": p_bytes + g_bytes + s_bytes}


def measure_training_memory_inprocess(config: TrainConfig, steps: int = 3) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps of ``config`` at its batch size, in this process.

    The model and optimiser are built exactly as the engine builds them (``nc_lib.train._build``,
    ``_make_optimizer``); the loss is :func:`training_loss`. GPU: ``torch.cuda.max_memory_allocated``
    after ``reset_peak_memory_stats`` (everything the model, activations, gradients and optimiser
    allocate). CPU: peak resident set size VmHWM (after ``echo 5 > /proc/self/clear_refs`` resets it
    to the current RSS, once the data batches are in memory and before the model is built) minus
    the RSS at that reset. Only meaningful in a fresh process: use :func:`measure_training_memory`.
    """
    from ..data import load_train_test, make_loader
    from ..train import _build, _make_optimizer, resolve_device

    steps = check_int("steps", steps, 1)
    device = resolve_device(config.device)
    train_set, _ = load_train_test(config.dataset, root=config.data_root, per_class=config.per_class,
                                   test_per_class=config.test_per_class, seed=config.data_seed,
                                   augment=config.augment, random_labels=config.random_labels,
                                   **{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.dataset_kwargs.items()})
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed,
                         drop_last=len(train_set) >= config.batch_size)
    batches = []
    for x, y in loader:
        batches.append((x.to(device), y.to(device)))
        if len(batches) == steps:
            break
    while len(batches) < steps:  # a dataset smaller than steps batches: repeat
        batches.append(batches[len(batches) % max(1, len(batches))])
    info = {"num_classes": train_set.num_classes, "input_shape": list(train_set.input_shape)}
    cuda = device.type == "cuda"

    def run_steps(n: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(config.seed)
        model = _build(config, device, info).train()
        opt = _make_optimizer(config, model)
        head_wd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
        for x, y in batches[:n]:
            if config.optimizer == "lbfgs":
                def closure() -> Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss, _ = training_loss(model, x, y, config.feature_decay)
                    reg = sum(p.pow(2).sum() for p in model.body.parameters() if p.requires_grad) * config.weight_decay \
                        + sum(p.pow(2).sum() for p in model.head.parameters() if p.requires_grad) * head_wd
                    loss = loss + 0.5 * reg
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.zero_grad(set_to_none=True)
                loss, _ = training_loss(model, x, y, config.feature_decay)
                loss.backward()
                opt.step()
        return model, opt

    # warm-up: the first step loads kernels, thread pools and library pages (the same for every
    # variant); then everything is freed and the measured run starts from that state
    model, opt = run_steps(1)
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base_rss = _status_kib("VmRSS")
        reset = _reset_peak_rss()
    model, opt = run_steps(steps)
    out: dict[str, Any] = {"device": str(device), "batch_size": config.batch_size, "steps": steps,
                           "trainable_parameters": count_parameters(model)}
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
        out["method"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_bytes"] = int((_status_kib("VmHWM") - base_rss) * 1024)
        out["process_peak_bytes"] = int(_status_kib("VmHWM") * 1024)
        out["method"] = "VmHWM - RSS before the model" + ("" if reset else " (clear_refs unavailable: peak since start)")
    out.update(state_bytes(model, opt))
    return out


def measure_training_memory(config: TrainConfig, steps: int = 3, *, threads: int = 1) -> dict[str, Any]:
    """:func:`measure_training_memory_inprocess` in a fresh Python process, so every variant is
    measured from the same starting state (no allocator caches or earlier peaks). ``threads``:
    torch threads in that process (intra-op buffers depend on it; keep it equal across variants)."""
    code = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[2])); "
            "from nc_lib.papers.zhu2021 import measure_training_memory_inprocess as m; "
            "from nc_lib.train import TrainConfig; "
            "print('@@' + json.dumps(m(TrainConfig.from_dict(json.loads(sys.argv[1])), int(sys.argv[3]))))")
    # a fixed mmap threshold: glibc serves every block of 64 KiB or more with its own mapping and
    # returns it on free, so the resident set follows the live tensors (no dynamic threshold)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config.to_dict()), str(int(threads)), str(int(steps))],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])


PAPER_SAVING = 0.20  # "reduces memory cost by over 20% on ResNet18" (in fact the parameter count, -20.7%)


def table1(configs: Mapping[str, TrainConfig], results: Mapping[str, RunResult] | None = None, *,
           steps: int = 3, memory: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Table 1: per variant, trainable parameters, measured peak training memory (MiB), parameter +
    gradient + optimiser-state memory (MiB) and final test accuracy (from ``results``).

    ``memory`` may pass measurements already taken (label -> :func:`measure_training_memory` dict).
    Savings are relative to the first label (the learned classifier at the wide d).
    """
    if not configs:
        raise ValueError("configs must hold at least one variant.")
    mem = {label: dict(memory[label]) if memory and label in memory else measure_training_memory(cfg, steps)
           for label, cfg in configs.items()}
    ref = next(iter(configs))
    rows = []
    for label, cfg in configs.items():
        m = mem[label]
        row = {"variant": label, "classifier": "fixed ETF" if cfg.head.startswith("fixed") else "learned",
               "feature dim d": cfg.feature_dim if cfg.feature_dim is not None else "network's own",
               "trainable parameters": int(m["trainable_parameters"]),
               "peak training memory (MiB)": round(m["peak_bytes"] / 2 ** 20, 2),
               "params+grads+optimiser state (MiB)": round(m["param_grad_state_bytes"] / 2 ** 20, 2),
               "memory saving vs first": round(1 - m["peak_bytes"] / mem[ref]["peak_bytes"], 4),
               "parameter saving vs first": round(1 - m["trainable_parameters"] / mem[ref]["trainable_parameters"], 4),
               "batch": cfg.batch_size, "device": m["device"]}
        if results is not None and label in results:
            row["test accuracy"] = round(float(results[label].final.get("test_accuracy", float("nan"))), 4)
        rows.append(row)
    return rows


def compare_with_paper(rows: Sequence[Mapping[str, Any]]) -> str:
    """One sentence comparing the measured saving of the fixed d = C variant with the paper's "over 20%"."""
    if not rows:
        raise ValueError("rows must hold the rows of table1.")
    best = rows[-1]
    saving, psaving = float(best["memory saving vs first"]), float(best["parameter saving vs first"])
    verdict = "more than" if saving > PAPER_SAVING else "less than"
    return (f"Measured: '{best['variant']}' uses {saving:.1%} less peak training memory than '{rows[0]['variant']}' "
            f"({rows[0]['peak training memory (MiB)']} -> {best['peak training memory (MiB)']} MiB) and has "
            f"{psaving:.1%} fewer trainable parameters; that is {verdict} the paper's \"over 20%\", which the authors "
            f"derived from the parameter count of ResNet18 (11.17M -> 8.87M, -20.7%) without measuring memory.")
