"""Papyan, Han & Donoho (2020), "Prevalence of neural collapse during the terminal phase of deep
learning training" (PNAS, arXiv 2008.08186): the experiment grid per scale and the builders of
``papyan2020_fig2`` .. ``fig8`` and ``papyan2020_table1`` (REFERENCE.md sections 2, 3 and 5).

Grid
----
:func:`grid` returns the :class:`~nc_lib.train.TrainConfig` of every run, keyed by
``(dataset, network)``:

- ``paper``: the 7 datasets x 3 networks of the paper, in the likely assignment of REFERENCE.md
  section 3 (the exact depths per dataset are not confirmed by the paper): MNIST VGG11/ResNet18/
  DenseNet40, FashionMNIST VGG11/ResNet18/DenseNet250, CIFAR10 VGG13/ResNet18/DenseNet40, CIFAR100
  VGG13/ResNet50/DenseNet250, SVHN VGG11/ResNet18/DenseNet40, STL10 VGG11/ResNet18/DenseNet201,
  ImageNet VGG13/ResNet50/DenseNet201. Papyan's protocol (:func:`nc_lib.train.papyan_preset`): CE,
  SGD momentum 0.9, weight decay 5e-4 (1e-4 ImageNet), batch 128, 350 epochs (300 ImageNet), lr x0.1
  at epochs/3 and 2 epochs/3, no augmentation, per-pixel standardisation, class-balanced subsets
  (MNIST 5000/class, SVHN 4600/class, ImageNet 600/class; the others are balanced already), the
  50 measurement epochs of his Colab (rescaled to 300 for ImageNet). The paper picks lr from 25
  log-spaced values in [1e-4, 0.25] by best final test error (:func:`nc_lib.train.lr_sweep`, a
  25-run sweep per cell); the learning rates found are not published, so the default here is his
  Colab's MNIST value :data:`DEFAULT_LR` = 0.0679 and ``grid("paper", lrs={...})`` takes the sweep's
  results. ResNets use the CIFAR stem (3x3 conv, stride 1, no max-pool; the Colab's MNIST ResNet18)
  except on ImageNet (ImageNet stem); DenseNet201 keeps its ImageNet stem (STL10's 96x96 images).
- ``quick``: offline data (scikit-learn digits, 8x8, all 1497 training and 300 test images;
  MNIST-1D, 100 training and 50 test signals per class) and tiny networks (an MLP 3 x 128, VGG11
  at width 1/8, lr 0.05; ResNet18 at width 1/8 and DenseNet-BC-40 at width 1/4, lr 0.1; on MNIST-1D,
  :data:`QUICK_RUN_OVERRIDES`: ResNet18 at width 3/16, lr 0.1, and DenseNet-BC-40 at width 3/4, lr 0.3,
  so that every run reaches zero training error: hand-picked, no sweep), the same protocol shortened
  to :data:`QUICK_EPOCHS` epochs.

Measurements
------------
Every measurement comes from the training engine's records (:mod:`nc_lib.metrics`, Papyan's
conventions): equinorm = std_c ||mu_c - mu_G|| / avg_c ||mu_c - mu_G|| (and of ||w_c||), Fig. 2;
equiangularity = std_{c != c'} cos(mu_c - mu_G, mu_c' - mu_G) (and of w), Fig. 3; maximal angle =
avg_{c != c'} |cos + 1/(C-1)|, Fig. 4; self-duality = ||W^T/||W||_F - Mdot/||Mdot||_F||_F^2, Fig. 5;
NC1 = Tr(Sigma_W Sigma_B^+)/C (log y), Fig. 6; NCC mismatch on test = fraction of test samples where
argmax(W h + b) != argmin_c ||h - mu_c||, Fig. 7. Fig. 8, robustness = mean over 100 test images of
||r(x)||_2 / ||x||_2 with DeepFool's perturbation r (:func:`nc_lib.deepfool.robustness`), is measured
here: the engine keeps only the latest checkpoint, so :func:`run_grid` passes an ``on_measure``
callback that loads the checkpoint just written and appends ``{"epoch", "robustness"}`` to
``<run>/papyan2020_robustness.jsonl`` (runs trained with ``keep_all_checkpoints=True`` can be
filled in afterwards by :func:`measure_robustness`).

The terminal phase of training (TPT) starts at the first measured epoch with zero training
error (training accuracy >= 99.6% on ImageNet, for its mislabels): :func:`terminal_phase_onset`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import plotly.graph_objects as go
import torch

from ..data import dataset_info, load_dataset
from ..deepfool import robustness as deepfool_robustness
from ..models import build_model
from ..plots import colour, plot_metric_curves
from ..plots import collapse_animation as _collapse_animation
from ..train import (PAPYAN_EPOCHS, RunResult, TrainConfig, papyan_measure_epochs, papyan_preset, resolve_device,
                     run_dir, train)
from ..validation import check_choice, check_int

SCALES = ("quick", "paper")

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

#: quick scale: datasets, networks (name, width, model options), epochs, learning rate
#: dataset -> (training images per class, test images per class); None keeps all
QUICK_DATASETS: dict[str, tuple[int | None, int | None]] = {"digits": (None, None), "mnist1d": (100, 50)}
#: network -> (width multiplier, model options, learning rate)
QUICK_NETWORKS: dict[str, tuple[float, dict[str, Any], float]] = {
    "mlp": (1.0, {"hidden": 128, "depth": 3}, 0.05),
    "vgg11": (0.125, {}, 0.05),
    "resnet18": (0.125, {}, 0.1),
    "densenet40": (0.25, {"bc": True}, 0.1),
}
#: (dataset, network) -> (width multiplier, learning rate) where a run needs its own at quick scale: on
#: MNIST-1D, ResNet18 at width 1/8 ends one sample short of zero training error and DenseNet-BC-40 at width 1/4
#: stalls near 77%; these reach zero training error by epochs ~14 and ~15 of 30.
QUICK_RUN_OVERRIDES: dict[tuple[str, str], tuple[float, float]] = {
    ("mnist1d", "resnet18"): (0.1875, 0.1),
    ("mnist1d", "densenet40"): (0.75, 0.3),
}
QUICK_EPOCHS = 30

#: number of test images DeepFool attacks at each measurement (Papyan: 100)
ROBUSTNESS_IMAGES = 100
ROBUSTNESS_FILE = "papyan2020_robustness.jsonl"

#: figure id -> (record keys, row titles, log y, panel title suffix)
FIGURES: dict[str, dict[str, Any]] = {
    "fig2": {"keys": ("equinorm_means", "equinorm_classifiers"), "log_y": False,
             "rows": ("Std/Avg of ||μ_c − μ_G||", "Std/Avg of ||w_c||")},
    "fig3": {"keys": ("equiangularity_means", "equiangularity_classifiers"), "log_y": False,
             "rows": ("Std of cos(μ_c − μ_G, μ_c' − μ_G)", "Std of cos(w_c, w_c')")},
    "fig4": {"keys": ("max_angle_means", "max_angle_classifiers"), "log_y": False,
             "rows": ("Avg |cos(μ_c − μ_G, μ_c' − μ_G) + 1/(C−1)|", "Avg |cos(w_c, w_c') + 1/(C−1)|")},
    "fig5": {"keys": ("self_duality",), "log_y": False, "rows": ("||W^T/||W|| − Ṁ/||Ṁ||||²",)},
    "fig6": {"keys": ("within_class_variability",), "log_y": True, "rows": ("Tr(Σ_W Σ_B⁺)/C",)},
    "fig7": {"keys": ("ncc_mismatch_test",), "log_y": False, "rows": ("NCC mismatch (test)",)},
    "fig8": {"keys": ("robustness",), "log_y": False, "rows": ("DeepFool ||r(x)||/||x|| (test)",)},
}

DATASET_NAMES = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
                 "svhn": "SVHN", "stl10": "STL10", "imagenet": "ImageNet", "digits": "digits (8x8)",
                 "mnist1d": "MNIST-1D", "gaussian": "Gaussian mixture", "fake": "FakeData"}
FAMILIES = ("mlp", "vgg", "resnet", "densenet")
FAMILY_NAMES = {"mlp": "MLP", "vgg": "VGG", "resnet": "ResNet", "densenet": "DenseNet"}

Key = tuple[str, str]


# ----------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------
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
    """The runs of Papyan et al.'s experiment at ``scale`` ("quick" or "paper"), keyed by (dataset, network).

    lrs: learning rate per key (e.g. from :func:`nc_lib.train.lr_sweep`); otherwise :data:`DEFAULT_LR`
    at paper scale and the network's rate in :data:`QUICK_NETWORKS` at quick scale. epochs: override the number of epochs
    (measurement epochs and lr milestones are rescaled with it). datasets: keep only these datasets.
    overrides: any other TrainConfig field, for every run (e.g. ``device="cpu"``).
    """
    scale = check_choice("scale", scale, SCALES)
    lrs = dict(lrs or {})
    if epochs is not None:
        epochs = check_int("epochs", epochs, 1)
    out: dict[Key, TrainConfig] = {}
    if scale == "paper":
        keep = list(PAPER_NETWORKS) if datasets is None else [check_choice("datasets", d, list(PAPER_NETWORKS))
                                                              for d in datasets]
        for ds in keep:
            E = epochs or PAPER_EPOCHS[ds]
            for net in PAPER_NETWORKS[ds]:
                kw: dict[str, Any] = {}
                if family(net) == "resnet":
                    kw["stem"] = "imagenet" if ds == "imagenet" else "cifar"
                cfg = dict(per_class=PAPER_PER_CLASS.get(ds), model_kwargs=kw, tag="papyan2020")
                # his Colab's list of 50 epochs at 350 epochs; rescaled for 300 (ImageNet) or an override
                cfg["measure_epochs"] = PAPYAN_EPOCHS if E == 350 else papyan_measure_epochs(E)
                cfg.update(overrides)
                out[(ds, net)] = papyan_preset(ds, net, epochs=E, lr=float(lrs.get((ds, net), DEFAULT_LR)), **cfg)
        return out
    keep = list(QUICK_DATASETS) if datasets is None else [check_choice("datasets", d, list(QUICK_DATASETS))
                                                         for d in datasets]
    E = epochs or QUICK_EPOCHS
    for ds in keep:
        for net, (width, kw, lr) in QUICK_NETWORKS.items():
            width, lr = QUICK_RUN_OVERRIDES.get((ds, net), (width, lr))
            per_class, test_per_class = QUICK_DATASETS[ds]
            cfg = dict(per_class=per_class, test_per_class=test_per_class, width=width, model_kwargs=dict(kw),
                       tag="papyan2020-quick", snapshot_per_class=20)
            cfg.update(overrides)
            out[(ds, net)] = papyan_preset(ds, net, epochs=E, lr=float(lrs.get((ds, net), lr)), **cfg)
    return out


# ----------------------------------------------------------------------------------------------
# Robustness (Fig. 8)
# ----------------------------------------------------------------------------------------------
def robustness_images(config: TrainConfig, n: int = ROBUSTNESS_IMAGES, seed: int = 0) -> torch.Tensor:
    """``n`` test inputs of the run's dataset (a fixed seeded choice), standardised as in training."""
    n = check_int("n", n, 1)
    test = load_dataset(config.dataset, split="test", root=config.data_root, seed=config.data_seed,
                        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.dataset_kwargs.items()})
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test), generator=g)[:n]
    if hasattr(test, "get_batch"):
        return test.get_batch(idx)[0]
    return torch.stack([test[int(i)][0] for i in idx])


def _model_from_checkpoint(config: TrainConfig, ckpt: Path, device: torch.device) -> torch.nn.Module:
    state = torch.load(ckpt, map_location=device, weights_only=False)
    info = state.get("model_info") or dataset_info(config.dataset, **config.dataset_kwargs)
    model = build_model(config.model, num_classes=info["num_classes"], input_shape=tuple(info["input_shape"]),
                        width=config.width, feature_dim=config.feature_dim, head=config.head, **config.model_kwargs)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def read_robustness(path: Path | RunResult) -> list[dict[str, float]]:
    """The ``{"epoch", "robustness"}`` records of a run (sorted by epoch; empty if none)."""
    path = path.path if isinstance(path, RunResult) else Path(path)
    f = path / ROBUSTNESS_FILE
    if not f.exists():
        return []
    recs = {int(r["epoch"]): r for r in (json.loads(l) for l in f.read_text().splitlines() if l.strip())}
    return [recs[e] for e in sorted(recs)]


def _write_robustness(path: Path, records: list[dict[str, float]]) -> None:
    tmp = path / (ROBUSTNESS_FILE + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["epoch"])))
    os.replace(tmp, path / ROBUSTNESS_FILE)


def robustness_callback(config: TrainConfig, epochs: Iterable[int] | None = None,
                        n_images: int = ROBUSTNESS_IMAGES) -> Callable[[dict[str, Any]], None]:
    """An ``on_measure`` callback for :func:`nc_lib.train.train`: at each measurement epoch (or only
    at ``epochs``) it loads the checkpoint the engine has just written and records DeepFool's
    robustness on ``n_images`` test images in ``<run>/papyan2020_robustness.jsonl``."""
    path = run_dir(config)
    wanted = None if epochs is None else {int(e) for e in epochs}
    device = resolve_device(config.device)
    cache: dict[str, torch.Tensor] = {}

    def on_measure(record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        if wanted is not None and epoch not in wanted:
            return
        ckpt = path / "checkpoints" / f"epoch_{epoch:04d}.pt"
        if not ckpt.exists():
            return
        if "x" not in cache:
            cache["x"] = robustness_images(config, n_images).to(device)
        model = _model_from_checkpoint(config, ckpt, device)
        value = deepfool_robustness(model, cache["x"])
        recs = [r for r in read_robustness(path) if int(r["epoch"]) != epoch]
        _write_robustness(path, recs + [{"epoch": epoch, "robustness": value}])

    return on_measure


def measure_robustness(result: RunResult, epochs: Iterable[int] | None = None,
                       n_images: int = ROBUSTNESS_IMAGES) -> list[dict[str, float]]:
    """Fill in the robustness of a finished run from its stored checkpoints (all of them exist only
    with ``keep_all_checkpoints=True``); epochs already recorded are kept. Returns the records."""
    cb = robustness_callback(result.config, epochs, n_images)
    done = {int(r["epoch"]) for r in read_robustness(result.path)}
    for ckpt in sorted((result.path / "checkpoints").glob("epoch_*.pt")):
        e = int(ckpt.stem.split("_")[1])
        if e not in done:
            cb({"epoch": e})
    return read_robustness(result.path)


def robustness_epochs(config: TrainConfig, points: int | None = None) -> list[int]:
    """The measurement epochs at which DeepFool runs: all of them (``points=None``, as Papyan) or
    ``points`` of them, evenly spread over the measured list (first and last included)."""
    eps = config.measurement_epochs()
    if points is None or points >= len(eps):
        return eps
    points = check_int("points", points, 2)
    idx = sorted({round(i * (len(eps) - 1) / (points - 1)) for i in range(points)})
    return [eps[i] for i in idx]


# ----------------------------------------------------------------------------------------------
# Training the grid
# ----------------------------------------------------------------------------------------------
def run_grid(configs: Mapping[Key, TrainConfig], progress: bool = True, *, robustness: bool = True,
             robustness_points: int | None = None, n_images: int = ROBUSTNESS_IMAGES) -> dict[Key, RunResult]:
    """Train every run of ``configs`` (a finished run is loaded, an interrupted one resumes) and, with
    ``robustness``, record DeepFool's robustness at its measurement epochs (``robustness_points``:
    see :func:`robustness_epochs`). Returns ``{key: RunResult}`` in the grid's order."""
    if not configs:
        raise ValueError("configs must hold at least one (dataset, network) -> TrainConfig.")
    results: dict[Key, RunResult] = {}
    for key, cfg in configs.items():
        eps = robustness_epochs(cfg, robustness_points) if robustness else None
        cb = robustness_callback(cfg, eps, n_images) if robustness else None
        res = train(cfg, progress=progress, on_measure=cb)
        if robustness:
            have = {int(r["epoch"]) for r in read_robustness(res.path)}
            if not set(eps or []) <= have:  # e.g. the run was finished before: fill from checkpoints left
                measure_robustness(res, [e for e in eps if e not in have], n_images)
        results[key] = res
    return results


def load_grid(configs: Mapping[Key, TrainConfig]) -> dict[Key, RunResult]:
    """The finished runs of ``configs`` (FileNotFoundError for any run not finished yet)."""
    from ..train import load_run

    return {k: load_run(c) for k, c in configs.items()}


# ----------------------------------------------------------------------------------------------
# Terminal phase
# ----------------------------------------------------------------------------------------------
def tpt_threshold(dataset: str) -> float:
    """Training accuracy that counts as zero training error: 1.0, and 0.996 on ImageNet (mislabels)."""
    return 0.996 if str(dataset).lower() == "imagenet" else 1.0


def terminal_phase_onset(history: Sequence[Mapping[str, Any]] | RunResult, dataset: str | None = None) -> int | None:
    """First measured epoch whose training accuracy reaches :func:`tpt_threshold` (None if never)."""
    if isinstance(history, RunResult):
        dataset = dataset or history.config.dataset
        history = history.history
    thr = tpt_threshold(dataset or "")
    for r in history:
        if r.get("train_accuracy", 0.0) >= thr - 1e-12:
            return int(r["epoch"])
    return None


def _records(result: RunResult, with_robustness: bool) -> list[dict[str, Any]]:
    recs = [dict(r) for r in result.history]
    if with_robustness:
        rob = {int(r["epoch"]): r["robustness"] for r in read_robustness(result.path)}
        for r in recs:
            if int(r["epoch"]) in rob:
                r["robustness"] = rob[int(r["epoch"])]
    return recs


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def figure(results: Mapping[Key, RunResult], key_or_keys: str | Sequence[str], *, log_y: bool | None = None,
           log_x: bool = False, title: str | None = None, row_titles: Sequence[str] | None = None,
           mark_tpt: bool = True) -> go.Figure:
    """Papyan's layout: a column per dataset, a row per measurement, a curve per network family,
    x = epoch, and the onset of the terminal phase of each network as a dashed line in its colour.

    key_or_keys: a figure of the paper ("fig2" .. "fig8", see :data:`FIGURES`) or record keys.
    """
    if not results:
        raise ValueError("results must hold at least one (dataset, network) -> RunResult.")
    if isinstance(key_or_keys, str) and key_or_keys in FIGURES:
        spec = FIGURES[key_or_keys]
        keys = list(spec["keys"])
        log_y = spec["log_y"] if log_y is None else log_y
        row_titles = list(row_titles or spec["rows"])
    else:
        keys = [key_or_keys] if isinstance(key_or_keys, str) else list(key_or_keys)
        if not keys:
            raise ValueError(f"key_or_keys must be one of {sorted(FIGURES)} or record keys.")
        row_titles = list(row_titles or keys)
        log_y = bool(log_y)
    datasets: list[str] = []
    for ds, _ in results:
        if ds not in datasets:
            datasets.append(ds)
    fams: list[str] = []
    for _, net in results:
        if family(net) not in fams:
            fams.append(family(net))
    fams = [f for f in FAMILIES if f in fams]
    colours = {FAMILY_NAMES[f]: colour(i) for i, f in enumerate(fams)}
    # one pseudo-key per (measurement, dataset): plot_metric_curves draws a subplot per key
    histories: dict[str, list[dict[str, Any]]] = {FAMILY_NAMES[f]: [] for f in fams}
    onsets: dict[tuple[str, str], int | None] = {}
    nets_per_ds: dict[str, list[str]] = {ds: [] for ds in datasets}
    with_rob = "robustness" in keys
    for (ds, net), res in sorted(results.items(), key=lambda kv: FAMILIES.index(family(kv[0][1]))):
        label = FAMILY_NAMES[family(net)]
        nets_per_ds[ds].append(network_label(net))
        onsets[(ds, label)] = terminal_phase_onset(res.history, ds)
        for r in _records(res, with_rob):
            histories[label].append({"epoch": r["epoch"], **{f"{k}|{ds}": r[k] for k in keys if k in r}})
    pkeys = [f"{k}|{ds}" for k in keys for ds in datasets]
    titles = {f"{k}|{ds}": (f"{DATASET_NAMES.get(ds, ds)}<br><sup>{', '.join(nets_per_ds[ds])}</sup>" if i == 0 else "")
              for i, k in enumerate(keys) for ds in datasets}
    n = len(datasets)
    fig = plot_metric_curves(histories, pkeys, x="epoch", log_y=log_y, titles=titles, cols=n, x_title="epoch",
                             colours=colours, band=False, width=min(1500, 330 * n + 160),
                             height=270 * len(keys) + 170)
    # the legend goes under the panels, clear of the figure title and the two-line panel titles
    fig.update_layout(legend=dict(orientation="h", x=0, y=-0.12 - 0.2 / len(keys), yanchor="top"),
                      margin=dict(t=120, b=110))
    for i, rt in enumerate(row_titles):
        fig.update_yaxes(title_text=rt, row=i + 1, col=1, title_font=dict(size=11))
    if log_x:
        fig.update_xaxes(type="log")
    if mark_tpt:
        for i in range(len(keys)):
            for j, ds in enumerate(datasets):
                for label, col in colours.items():
                    e = onsets.get((ds, label))
                    if e is not None:
                        fig.add_vline(x=e, line=dict(color=col, dash="dash", width=1.3), row=i + 1, col=j + 1)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="TPT onset (first zero train error)",
                                 line=dict(color="grey", dash="dash")))
    if title:
        fig.update_layout(title=title)
    return fig


def figure_equinorm(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig2."""
    return figure(results, "fig2", **kw)


def figure_equiangularity(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig3."""
    return figure(results, "fig3", **kw)


def figure_max_angle(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig4."""
    return figure(results, "fig4", **kw)


def figure_self_duality(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig5."""
    return figure(results, "fig5", **kw)


def figure_nc1(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig6 (log y)."""
    return figure(results, "fig6", **kw)


def figure_ncc(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig7."""
    return figure(results, "fig7", **kw)


def figure_robustness(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig8: DeepFool robustness against epoch."""
    return figure(results, "fig8", **kw)


# ----------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------
def table1(results: Mapping[Key, RunResult]) -> list[dict[str, Any]]:
    """Papyan's Table 1: per (dataset, network), the test accuracy at the first epoch of zero training
    error (the TPT onset; None if never reached) and at the last epoch."""
    rows = []
    for (ds, net), res in results.items():
        onset = terminal_phase_onset(res.history, ds)
        at = next((r for r in res.history if int(r["epoch"]) == onset), None) if onset is not None else None
        last = res.history[-1] if res.history else {}
        rows.append({"dataset": DATASET_NAMES.get(ds, ds), "network": network_label(net),
                     "tpt_onset_epoch": onset,
                     "test_accuracy_at_zero_train_error": None if at is None else at.get("test_accuracy"),
                     "last_epoch": last.get("epoch"),
                     "test_accuracy_at_last_epoch": last.get("test_accuracy")})
    return rows


# ----------------------------------------------------------------------------------------------
# The collapse animation on a real run
# ----------------------------------------------------------------------------------------------
def animation_snapshots(result: RunResult) -> list[dict[str, Any]]:
    """The run's snapshots in the form :func:`nc_lib.plots.collapse_animation` reads (``step`` = epoch,
    ``feature_labels`` = the sample's labels)."""
    snaps = result.snapshots()
    if not snaps:
        raise ValueError(f"run {result.path} has no snapshots; train with snapshot_per_class > 0.")
    return [{**s, "step": int(s["epoch"]), "feature_labels": s["labels"]} for s in snaps]


def collapse_animation(result: RunResult, **kw: Any) -> go.Figure:
    """The collapse animation (class means, classifier rows, a feature sample at each measurement
    epoch) of one real run; the slider counts epochs."""
    cfg = result.config
    kw.setdefault("title", f"Neural collapse while training {network_label(cfg.model)} on "
                           f"{DATASET_NAMES.get(cfg.dataset, cfg.dataset)}")
    fig = _collapse_animation(animation_snapshots(result), **kw)
    if fig.layout.sliders:
        fig.layout.sliders[0].currentvalue.prefix = "epoch "
    return fig


def scale_note(scale: str) -> str:
    """What differs from the paper at ``scale`` (for save_figure's ``note``)."""
    scale = check_choice("scale", scale, SCALES)
    if scale == "paper":
        return ("Paper protocol (7 datasets x 3 networks, 350 epochs / 300 ImageNet, Papyan's subsets and measurement "
                "epochs); network depth per dataset is the likely assignment of REFERENCE section 3 (unconfirmed); "
                f"lr {DEFAULT_LR} (the authors' Colab) unless a sweep result was given.")
    return (f"quick scale: offline data (sklearn digits 8x8; MNIST-1D, 100 train / 50 test per class) instead of the 7 "
            f"image datasets; tiny MLP 3x128 / VGG11 (width 1/8) / ResNet18 (width 1/8) / DenseNet-BC-40 (width 1/4); "
            f"{QUICK_EPOCHS} epochs instead of 350 (lr x0.1 at 10 and 20); lr 0.05 (MLP, VGG) or 0.1 (ResNet, "
            f"DenseNet) picked by hand, no 25-value sweep; otherwise Papyan's protocol.")
