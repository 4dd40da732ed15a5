"""Papyan, Han & Donoho (2020)'s runs: train (or load) the grid, measure robustness, find the terminal phase.

Measurements. Every measurement comes from the training engine's records (:mod:`nc_lib.metrics`, Papyan's
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

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ...atomic_io import atomic_write_jsonl
from ...config import TrainConfig, resolve_device
from ...data import load_dataset
from ...deepfool import robustness as deepfool_robustness
from ...runs import RunResult, load_run, model_from_checkpoint, read_jsonl, run_dir
from ...train import train
from ...validation import SCALES, check_choice, check_int
from .grid import Key

#: number of test images DeepFool attacks at each measurement (Papyan: 100)
ROBUSTNESS_IMAGES = 100
ROBUSTNESS_FILE = "papyan2020_robustness.jsonl"


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


def read_robustness(path: Path | RunResult) -> list[dict[str, float]]:
    """The ``{"epoch", "robustness"}`` records of a run (sorted by epoch; empty if none)."""
    path = path.path if isinstance(path, RunResult) else Path(path)
    recs = {int(r["epoch"]): r for r in read_jsonl(path / ROBUSTNESS_FILE)}
    return [recs[e] for e in sorted(recs)]


def _write_robustness(path: Path, records: list[dict[str, float]]) -> None:
    atomic_write_jsonl(path / ROBUSTNESS_FILE, sorted(records, key=lambda r: r["epoch"]))


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
        model = model_from_checkpoint(config, ckpt, device)
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


def records_with_robustness(result: RunResult, with_robustness: bool) -> list[dict[str, Any]]:
    """The run's measurement records, each with its ``robustness`` where one was measured at that epoch."""
    recs = [dict(r) for r in result.history]
    if with_robustness:
        rob = {int(r["epoch"]): r["robustness"] for r in read_robustness(result.path)}
        for r in recs:
            if int(r["epoch"]) in rob:
                r["robustness"] = rob[int(r["epoch"])]
    return recs


# ----------------------------------------------------------------------------------------------
# What the paper found, checked on the runs
# ----------------------------------------------------------------------------------------------
#: the measurements that Papyan et al. see falling through the whole terminal phase (besides NC1): the means'
#: equinorm, equiangularity and maximal angle (NC2), the self-duality (NC3) and the test NCC mismatch (NC4)
TPT_FALLING = ("equinorm_means", "equiangularity_means", "max_angle_means", "self_duality", "ncc_mismatch_test")
#: the least factor by which NC1 must fall from the onset of the terminal phase to the last epoch, per scale: the
#: paper's NC1 falls by two to three decades over its 230-340 epochs of terminal phase
MIN_NC1_FALL = {"quick": 10.0, "medium": 100.0, "paper": 100.0}


def terminal_phase_report(results: Mapping[Key, RunResult]) -> list[dict[str, Any]]:
    """Per run: the TPT onset, and NC1, test accuracy and each of :data:`TPT_FALLING` at the onset and at the
    last epoch, with NC1's fall = NC1(onset) / NC1(end). A run that never reaches zero training error has
    onset None and no onset values."""
    rows = []
    for (ds, net), res in results.items():
        if not res.history:
            raise ValueError(f"run {res.path} ({ds}/{net}) has no measurement records; train it first.")
        onset = terminal_phase_onset(res.history, ds)
        at = next((r for r in res.history if int(r["epoch"]) == onset), None) if onset is not None else None
        last = res.history[-1]
        row: dict[str, Any] = {"dataset": ds, "network": net, "epochs": int(res.config.epochs), "tpt_onset": onset,
                               "last_epoch": int(last["epoch"])}
        for key, name in (("within_class_variability", "nc1"), ("test_accuracy", "test_accuracy"),
                          *((k, k) for k in TPT_FALLING)):
            row[f"{name}_at_onset"] = None if at is None else float(at[key])
            row[f"{name}_at_end"] = float(last[key])
        nc1_on, nc1_end = row["nc1_at_onset"], row["nc1_at_end"]
        row["nc1_fall"] = None if nc1_on is None else (float("inf") if nc1_end <= 0 else nc1_on / nc1_end)
        rows.append(row)
    return rows


def fidelity_failures(results: Mapping[Key, RunResult], scale: str) -> list[str]:
    """What the runs fail to show of Papyan et al.'s findings (an empty list when they show all of it):

    - every run reaches zero training error within the first half of its epochs;
    - from the onset of the terminal phase to the last epoch NC1 falls at least :data:`MIN_NC1_FALL` [scale];
    - each of :data:`TPT_FALLING` ends below its value at the onset.
    """
    scale = check_choice("scale", scale, SCALES)
    out = []
    for row in terminal_phase_report(results):
        run = f"{row['dataset']}/{row['network']}"
        onset, E = row["tpt_onset"], row["epochs"]
        if onset is None:
            out.append(f"{run}: never reached zero training error in {E} epochs")
            continue
        if onset > E / 2:
            out.append(f"{run}: zero training error only at epoch {onset}, after the first half of {E} epochs")
        if row["nc1_fall"] < MIN_NC1_FALL[scale]:
            out.append(f"{run}: NC1 fell {row['nc1_fall']:.3g}x over the terminal phase "
                       f"({row['nc1_at_onset']:.3g} -> {row['nc1_at_end']:.3g}), less than {MIN_NC1_FALL[scale]:g}x")
        for k in TPT_FALLING:
            if not row[f"{k}_at_end"] < row[f"{k}_at_onset"]:
                out.append(f"{run}: {k} ended at {row[f'{k}_at_end']:.3g}, not below its "
                           f"{row[f'{k}_at_onset']:.3g} at the onset (epoch {onset})")
    return out
