"""The run store: where a training run lives on disk, how it is written as it trains, how it is read back.

A run is fully described by a :class:`nc_lib.config.TrainConfig`; its directory is
``runs_dir()/<dataset>-<model>-<hash>`` (:func:`run_dir`), keyed by a hash of the configuration
(:meth:`~nc_lib.config.TrainConfig.config_hash`), and holds

- ``config.json``  the configuration; ``env.json`` versions, device, machine (:func:`environment_record`);
- ``metrics.jsonl`` one JSON record per measurement epoch (deterministic numbers only);
- ``timings.jsonl`` wall-clock seconds of training and measuring, per measurement epoch;
- ``checkpoints/epoch_NNNN.pt`` model, optimiser, scheduler, RNG states and epoch, at measurement
  epochs (only the latest is kept unless ``keep_all_checkpoints``);
- ``snapshots/epoch_NNNN.pt`` class means, global mean, classifier (W, b) and the features of a
  fixed sample of training images (20 per class, at most 2000), for the collapse animation;
- ``done.json`` written last: its presence means the run is finished and is loaded, not retrained.

Every file is written through :mod:`nc_lib.atomic_io` (a temporary file renamed into place), so a
reader, or a run resumed after a kill, never sees a half-written file. :class:`RunWriter` writes a
run's records, snapshots and checkpoints at its measurement epochs; :func:`resume_checkpoint` loads
the last checkpoint (with the RNG states, so that a resumed CPU run reproduces an uninterrupted one);
:func:`load_run`, :func:`run_history` and :func:`is_finished` read runs back, and :class:`RunResult`
gives a run's history, model and snapshots.
"""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .atomic_io import atomic_torch_save, atomic_write_json, atomic_write_jsonl
from .config import TrainConfig, build_run_model
from .features import snapshot_features
from .metrics import CollapseAccumulator
from .models import Classifier
from .paths import runs_dir


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (empty when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_dir(config: TrainConfig) -> Path:
    """The run directory of a configuration: ``runs_dir()/<dataset>-<model>-<hash>``."""
    return runs_dir() / f"{config.dataset}-{config.model}-{config.config_hash()}"


def environment_record(device: torch.device) -> dict[str, Any]:
    """Versions, device and machine of a run (``env.json``)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:  # the installed version, without importing torchvision
        tv = version("torchvision")
    except PackageNotFoundError:
        tv = None

    rec: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": tv, "numpy": np.__version__, "nc_lib": __version__,
        "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    return rec


def write_run_start(path: Path, config: TrainConfig, device: torch.device, **env_extra: Any) -> None:
    """Create the run directory and write ``config.json`` and ``env.json`` (:func:`environment_record`
    of ``device``, plus ``env_extra``)."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "config.json", config.to_dict())
    atomic_write_json(path / "env.json", {**environment_record(device), **env_extra})


class EpochResult(NamedTuple):
    """Running sums of one training epoch (over all ranks) and the learning rate it used (under
    AGD: the mean of its automatic step size eta over the epoch's steps)."""

    loss_sum: float
    correct: int
    n: int
    lr: float


@dataclass
class RunResult:
    """A run on disk: its configuration, directory and measurement history."""

    config: TrainConfig
    path: Path
    history: list[dict[str, Any]]
    finished: bool

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def model(self, device: str | torch.device = "cpu") -> Classifier:
        """The model at its last checkpoint."""
        ckpt = last_checkpoint(self.path)
        if ckpt is None:
            raise FileNotFoundError(f"run {self.path} has no checkpoint yet.")
        return model_from_checkpoint(self.config, ckpt, device)

    def snapshots(self) -> list[dict[str, Any]]:
        """Per measurement epoch: ``epoch``, ``means`` (C x p), ``global_mean``, ``W``, ``b``,
        ``features`` (k x p, a fixed training sample) and ``labels``."""
        files = sorted((self.path / "snapshots").glob("epoch_*.pt"))
        return [torch.load(f, map_location="cpu", weights_only=False) for f in files]

    def timings(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "timings.jsonl")

    def terminal_phase_onset(self, threshold: float = 1.0) -> int | None:
        """First measured epoch with training accuracy >= ``threshold`` (Papyan's TPT onset;
        use 0.996 for ImageNet)."""
        for r in self.history:
            if r.get("train_accuracy", 0.0) >= threshold:
                return int(r["epoch"])
        return None


def model_from_checkpoint(config: TrainConfig, ckpt: Path, device: str | torch.device = "cpu") -> Classifier:
    """The network of ``config`` with the weights of checkpoint file ``ckpt``, on ``device``, in eval mode."""
    device = torch.device(device) if isinstance(device, str) else device
    state = torch.load(ckpt, map_location=device, weights_only=False)
    model = build_run_model(config, device, state.get("model_info"))
    model.load_state_dict(state["model"])
    return model.eval()


def last_checkpoint(path: Path) -> Path | None:
    """The run's latest checkpoint file (None without one)."""
    files = sorted((path / "checkpoints").glob("epoch_*.pt"))
    return files[-1] if files else None


def run_history(config: TrainConfig) -> list[dict[str, Any]]:
    """The measurement records of a run (finished or not; empty if it never started)."""
    return read_jsonl(run_dir(config) / "metrics.jsonl")


def load_run(config: TrainConfig) -> RunResult:
    """A finished run from disk; FileNotFoundError if it has not finished (train it with :func:`train`)."""
    path = run_dir(config)
    if not (path / "done.json").exists():
        raise FileNotFoundError(f"no finished run for this configuration in {path}; call nc_lib.train.train(config).")
    return RunResult(config, path, read_jsonl(path / "metrics.jsonl"), True)


def is_finished(config: TrainConfig) -> bool:
    """Whether the run of ``config`` has finished (its ``done.json`` exists)."""
    return (run_dir(config) / "done.json").exists()


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch, NumPy and Python RNG states (and CUDA's on a CUDA device), as a checkpoint keeps them."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore the RNG states of :func:`rng_state`."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def resume_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                       sched: torch.optim.lr_scheduler.LRScheduler, *, restore_rng: bool = True) -> int:
    """Load the run's last checkpoint into model, optimiser and scheduler (and the RNG states);
    returns its epoch (0 without a checkpoint)."""
    ckpt = last_checkpoint(path)
    if ckpt is None:
        return 0
    # on the CPU first: RNG states must stay CPU byte tensors; weights and optimiser state are
    # copied to the model's device by load_state_dict
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return int(state["epoch"])


def _to_float(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Tensor):
        return v.item()
    return v


@dataclass
class RunWriter:
    """The measurement records of a run and the files written at its measurement epochs.

    ``write=False`` (data-parallel ranks other than 0) keeps the records in memory and writes
    nothing. ``timing_extra`` is added to every timings.jsonl record; ``t_train`` accumulates the
    training seconds since the last measurement.
    """

    config: TrainConfig
    path: Path
    model_info: dict[str, Any]
    snapshot_set: Any = None
    snapshot_idx: Tensor | None = None
    write: bool = True
    timing_extra: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    t_train: float = 0.0

    def resume(self, start: int) -> None:
        """Keep the records of epochs <= ``start`` (the checkpoint's) and rewrite the files."""
        self.records = [r for r in read_jsonl(self.path / "metrics.jsonl") if r["epoch"] <= start]
        self.timings = [t for t in read_jsonl(self.path / "timings.jsonl") if t["epoch"] <= start]
        if self.write:
            atomic_write_jsonl(self.path / "metrics.jsonl", self.records)
            atomic_write_jsonl(self.path / "timings.jsonl", self.timings)

    def measure(self, epoch: int, ep: EpochResult, model: Classifier, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                measure_fn: Callable[[], tuple[dict[str, float], CollapseAccumulator]], *,
                model_state: Callable[[], dict[str, Any]] | None = None,
                on_measure: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Measure (``measure_fn()`` -> (results, accumulator)) and record epoch ``epoch``: the record
        (epoch, lr, running loss/accuracy of ``ep`` and the results), the snapshot (class means,
        global mean, W, b, features of the fixed sample), metrics.jsonl and timings.jsonl, then the
        checkpoint (``model_state()``, default ``model.state_dict()``), deleting older checkpoints
        unless ``keep_all_checkpoints``. Returns the record."""
        t1 = time.perf_counter()
        res, acc = measure_fn()
        record: dict[str, Any] = {"epoch": epoch, "lr": ep.lr, "train_loss_running": ep.loss_sum / ep.n,
                                  "train_accuracy_running": ep.correct / ep.n}
        record.update({k: _to_float(v) for k, v in res.items()})
        self.records.append(record)
        if self.write:
            path, config = self.path, self.config
            if self.snapshot_idx is not None:
                W, b = model.head.classifier()
                snap = {"epoch": epoch, "means": acc.means.float().cpu(), "global_mean": acc.global_mean.float().cpu(),
                        "W": W.float().cpu(), "b": None if b is None else b.float().cpu(),
                        "features": snapshot_features(model, self.snapshot_set, self.snapshot_idx, device,
                                                       config.eval_batch_size),
                        "labels": self.snapshot_set.targets[self.snapshot_idx].clone()}
                atomic_torch_save(path / "snapshots" / f"epoch_{epoch:04d}.pt", snap)
            self.timings.append({"epoch": epoch, "train_s_since_last": self.t_train,
                                 "measure_s": time.perf_counter() - t1, **self.timing_extra})
            # metrics first, then the checkpoint: a run killed in between re-measures nothing twice
            atomic_write_jsonl(path / "metrics.jsonl", self.records)
            atomic_write_jsonl(path / "timings.jsonl", self.timings)
            state = {"epoch": epoch, "model_info": self.model_info,
                     "model": model.state_dict() if model_state is None else model_state(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(device)}
            old = list((path / "checkpoints").glob("epoch_*.pt"))
            atomic_torch_save(path / "checkpoints" / f"epoch_{epoch:04d}.pt", state)
            if not config.keep_all_checkpoints:
                for f in old:
                    if f.name != f"epoch_{epoch:04d}.pt":
                        f.unlink(missing_ok=True)
        self.t_train = 0.0
        if on_measure is not None:
            on_measure(record)
        return record

    def finish(self, **extra: Any) -> None:
        """Write done.json (the run is finished)."""
        if self.write:
            atomic_write_json(self.path / "done.json", {"epochs": self.config.epochs,
                                                         "final": self.records[-1] if self.records else {}, **extra})
