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

**Damage.** A run's files can still be damaged from outside (a full disk, a copy cut short, an editor).
Each case ends in recovery with nothing lost, or in a :class:`RunFileError` that names the file, says
what is wrong and what to do; never a raw unpickling error and never a silently empty history:

- a damaged line of ``metrics.jsonl`` (truncated, garbage) or a missing file: the records are checked
  against the run's measurement epochs (:func:`check_history`); a running run resumes from the newest
  checkpoint whose records are all intact (the records after it are measured again), a finished run
  whose records are all there gets the file rewritten clean; a record that is lost is an error;
- a damaged checkpoint (zero-length, truncated, garbage): the previous checkpoint is kept while a run
  trains (two are on disk until it finishes) and a resumed run falls back to it; with none to fall
  back to, an error says which file to delete to retrain from which epoch;
- a damaged snapshot: an error naming it at resume and in :meth:`RunResult.snapshots`;
- a finished run without ``config.json`` gets it rewritten.

**One writer per run.** :class:`RunLock` (``<run dir>/run.lock``, created with O_CREAT|O_EXCL, with a
heartbeat) keeps a second process off a run that one is training; :func:`hold_run_lock` is what the
engine takes (a lock its holder left behind, dead, is taken over).
"""
from __future__ import annotations

import json
import os
import platform
import random
import socket
import sys
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .atomic_io import (atomic_torch_save, atomic_write_json, atomic_write_jsonl, pid_alive,
                        remove_stale_temporaries)
from .config import TrainConfig, build_run_model
from .features import snapshot_features
from .metrics import CollapseAccumulator
from .models import Classifier
from .paths import runs_dir
from .validation import check_positive

RETRAIN_HINT = "retrain it with nc_lib.train.train(config, retrain=True) (or delete the folder {path})"


class RunFileError(RuntimeError):
    """A file of a run is damaged or missing and cannot be recovered without losing data: the message
    names the file, says what is wrong and what to do."""


class RunLockedError(RuntimeError):
    """The run is being trained by another live process (named in the message)."""


def read_jsonl_lenient(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of a JSON-lines file and the (1-based) numbers of its damaged lines (a truncated or
    garbage line, or one that is not a JSON object). Empty when the file does not exist."""
    if not path.exists():
        return [], []
    records, bad = [], []
    for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append(n)
    return records, bad


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (empty when it does not exist); RunFileError naming the file and
    its damaged lines if any line is not a JSON object."""
    records, bad = read_jsonl_lenient(path)
    if bad:
        raise RunFileError(f"{path} is damaged: line(s) {bad} are not JSON records (a truncated or garbage "
                           "line). Delete those lines, or the file, to rebuild what it holds.")
    return records


def _epoch_of(rec: dict[str, Any]) -> int | None:
    try:
        return int(rec["epoch"])
    except (KeyError, TypeError, ValueError):
        return None


def check_history(path: Path, config: TrainConfig, upto: int) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """The measurement records of the run in ``path`` for its measurement epochs <= ``upto``, one per
    epoch in epoch order, with the epochs whose record is missing and the damaged line numbers of
    ``metrics.jsonl``. Records of later epochs and damaged lines are left out."""
    records, bad = read_jsonl_lenient(path / "metrics.jsonl")
    wanted = [e for e in config.measurement_epochs() if e <= upto]
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in records:
        e = _epoch_of(r)
        if e is None:
            continue
        by_epoch[e] = r  # a rewritten epoch: the last record wins
    missing = [e for e in wanted if e not in by_epoch]
    return [by_epoch[e] for e in wanted if e in by_epoch], missing, bad


def _history_error(path: Path, missing: list[int], bad: list[int], what: str) -> RunFileError:
    f = path / "metrics.jsonl"
    why = "does not exist" if not f.exists() else (
        f"has damaged line(s) {bad}" if bad else "lacks them")
    return RunFileError(f"{f}: the measurement records of epochs {missing} are lost ({f.name} {why}); they "
                        f"cannot be rebuilt without training again: {what}.")


def _clean_history(path: Path, config: TrainConfig, upto: int, what: str) -> list[dict[str, Any]]:
    """:func:`check_history` up to ``upto``; RunFileError (with ``what`` to do) if a record is lost;
    rewrites ``metrics.jsonl`` if it held damaged lines."""
    records, missing, bad = check_history(path, config, upto)
    if missing:
        raise _history_error(path, missing, bad, what)
    if bad:
        warnings.warn(f"{path / 'metrics.jsonl'}: dropped damaged line(s) {bad}; every record of the run is intact "
                      "and the file was rewritten.", RuntimeWarning, stacklevel=3)
        atomic_write_jsonl(path / "metrics.jsonl", records)
    return records


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
        ``features`` (k x p, a fixed training sample) and ``labels``. RunFileError naming a damaged file."""
        files = sorted((self.path / "snapshots").glob("epoch_*.pt"))
        out = []
        for f in files:
            try:
                out.append(torch.load(f, map_location="cpu", weights_only=False))
            except Exception as e:  # zero-length, truncated or garbage
                raise _snapshot_error(f, e, self.path) from None
        return out

    def timings(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "timings.jsonl")

    def terminal_phase_onset(self, threshold: float = 1.0) -> int | None:
        """First measured epoch with training accuracy >= ``threshold`` (Papyan's TPT onset;
        use 0.996 for ImageNet)."""
        for r in self.history:
            if r.get("train_accuracy", 0.0) >= threshold:
                return int(r["epoch"])
        return None


def _snapshot_error(f: Path, e: BaseException, path: Path) -> RunFileError:
    return RunFileError(f"snapshot {f} is damaged ({type(e).__name__}: {str(e)[:120] or 'empty file'}); it cannot be "
                        "rebuilt without training again: delete it to go on without that epoch's snapshot (the "
                        f"collapse animation skips it), or {RETRAIN_HINT.format(path=path)}.")


def snapshot_is_intact(f: Path) -> bool:
    """Whether snapshot (or checkpoint) file ``f`` is a whole torch.save archive: not empty, a zip whose
    every member passes its CRC check (no unpickling)."""
    try:
        if f.stat().st_size == 0 or not zipfile.is_zipfile(f):
            return False
        with zipfile.ZipFile(f) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def load_checkpoint(ckpt: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of checkpoint file ``ckpt``; :class:`RunFileError` naming it when it is damaged."""
    try:
        state = torch.load(ckpt, map_location=map_location, weights_only=False)
        if not isinstance(state, dict) or not {"epoch", "model"} <= set(state):
            raise ValueError("not a checkpoint of nc_lib (no 'epoch' and 'model' entries)")
        int(state["epoch"])
        return state
    except Exception as e:  # zero-length (EOFError), truncated (RuntimeError), garbage (UnpicklingError) ...
        raise RunFileError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {str(e)[:120] or 'empty file'}).") from None


def _checkpoint_epoch(f: Path) -> int:
    return int(f.stem.split("_")[1])


def model_from_checkpoint(config: TrainConfig, ckpt: Path, device: str | torch.device = "cpu") -> Classifier:
    """The network of ``config`` with the weights of checkpoint file ``ckpt``, on ``device``, in eval mode."""
    device = torch.device(device) if isinstance(device, str) else device
    try:
        state = load_checkpoint(ckpt, device)
    except RunFileError as e:
        raise RunFileError(f"{e} It cannot be rebuilt without training again: "
                           f"{RETRAIN_HINT.format(path=Path(ckpt).parent.parent)}.") from None
    model = build_run_model(config, device, state.get("model_info"))
    model.load_state_dict(state["model"])
    return model.eval()


def last_checkpoint(path: Path) -> Path | None:
    """The run's latest checkpoint file (None without one)."""
    files = sorted((path / "checkpoints").glob("epoch_*.pt"))
    return files[-1] if files else None


def run_history(config: TrainConfig) -> list[dict[str, Any]]:
    """The measurement records of a run (finished or not; empty if it never started); damaged lines of a
    running run are left out (with a warning: the run measures them again when it resumes)."""
    path = run_dir(config)
    if (path / "done.json").exists():
        return load_run(config).history
    records, bad = read_jsonl_lenient(path / "metrics.jsonl")
    if bad:
        warnings.warn(f"{path / 'metrics.jsonl'}: damaged line(s) {bad} left out; the run measures those epochs "
                      "again when it resumes.", RuntimeWarning, stacklevel=2)
    return records


def load_run(config: TrainConfig) -> RunResult:
    """A finished run from disk; FileNotFoundError if it has not finished (train it with :func:`train`).

    Its history is checked against the measurement epochs (:func:`check_history`): RunFileError if a record
    is lost; a missing ``config.json`` is rewritten."""
    path = run_dir(config)
    if not (path / "done.json").exists():
        raise FileNotFoundError(f"no finished run for this configuration in {path}; call nc_lib.train.train(config).")
    if not (path / "config.json").exists():
        atomic_write_json(path / "config.json", config.to_dict())
    history = _clean_history(path, config, config.epochs, f"this finished run must be trained again; "
                                                         f"{RETRAIN_HINT.format(path=path)}")
    return RunResult(config, path, history, True)


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
                       sched: torch.optim.lr_scheduler.LRScheduler, *, restore_rng: bool = True,
                       config: TrainConfig | None = None) -> int:
    """Load the run's last good checkpoint into model, optimiser and scheduler (and the RNG states);
    returns its epoch (0 without a checkpoint).

    A damaged checkpoint (or, given ``config``, one whose measurement records in metrics.jsonl are not all
    intact) is set aside with a warning and the previous one is used; RunFileError naming the file and
    what to delete when none is usable."""
    files = sorted((path / "checkpoints").glob("epoch_*.pt"), reverse=True)
    if not files:
        return 0
    state, problems = None, []
    for f in files:
        try:
            cand = load_checkpoint(f)  # on the CPU: RNG states must stay CPU byte tensors
        except RunFileError as e:
            problems.append((f, str(e)))
            continue
        if config is not None:
            _, missing, bad = check_history(path, config, int(cand["epoch"]))
            if missing:
                problems.append((f, str(_history_error(path, missing, bad, "the run goes back to an earlier checkpoint"))))
                continue
        state = cand
        break
    if state is None:
        raise RunFileError(f"{problems[0][1]} No checkpoint of {path} can be used: delete this run's checkpoint(s) "
                           f"({', '.join(str(f) for f, _ in problems)}) to retrain it from epoch 0, "
                           f"or {RETRAIN_HINT.format(path=path)}.")
    for f, why in problems:  # newer than the one used: set aside (they would be written again)
        warnings.warn(f"{why} Resuming {path} from epoch {int(state['epoch'])} instead; {f.name} is removed.",
                      RuntimeWarning, stacklevel=2)
        f.unlink(missing_ok=True)
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
        """Keep the records of epochs <= ``start`` (the checkpoint's) and rewrite the files; remove the
        snapshots of later epochs (written again) and stale temporaries of killed writers.

        RunFileError (naming the file and what to do) when a record or a snapshot of an epoch <= ``start``
        is damaged or lost; damaged lines of later epochs are dropped (they are measured again)."""
        what = (f"delete this run's checkpoints ({self.path / 'checkpoints'}) to retrain it from epoch 0, or "
                + RETRAIN_HINT.format(path=self.path))
        self.records = _clean_history(self.path, self.config, start, what) if start > 0 else []
        timings, bad = read_jsonl_lenient(self.path / "timings.jsonl")  # wall-clock only: damaged lines dropped
        self.timings = [t for t in timings if (_epoch_of(t) or 0) and _epoch_of(t) <= start]
        if self.write:
            remove_stale_temporaries(self.path)
            for f in sorted((self.path / "snapshots").glob("epoch_*.pt")):
                if _checkpoint_epoch(f) > start:
                    f.unlink(missing_ok=True)
                elif not snapshot_is_intact(f):
                    raise _snapshot_error(f, EOFError("not a whole torch archive"), self.path)
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
            atomic_torch_save(path / "checkpoints" / f"epoch_{epoch:04d}.pt", state)
            # the previous checkpoint stays until the run finishes: a resume falls back to it when the
            # newest is damaged
            if not config.keep_all_checkpoints:
                prune_checkpoints(path, keep=2, upto=epoch)
        self.t_train = 0.0
        if on_measure is not None:
            on_measure(record)
        return record

    def finish(self, **extra: Any) -> None:
        """Write done.json (the run is finished); keep only the last checkpoint (unless
        ``keep_all_checkpoints``) and remove stale temporaries."""
        if self.write:
            atomic_write_json(self.path / "done.json", {"epochs": self.config.epochs,
                                                         "final": self.records[-1] if self.records else {}, **extra})
            if not self.config.keep_all_checkpoints:
                prune_checkpoints(self.path, keep=1)
            remove_stale_temporaries(self.path)


def prune_checkpoints(path: Path, *, keep: int, upto: int | None = None) -> None:
    """Delete all but the ``keep`` newest checkpoints of epochs <= ``upto`` (and any later ones: left by a
    run that went back to an earlier checkpoint)."""
    files = sorted((path / "checkpoints").glob("epoch_*.pt"))
    if upto is not None:
        for f in files:
            if _checkpoint_epoch(f) > upto:
                f.unlink(missing_ok=True)
        files = [f for f in files if _checkpoint_epoch(f) <= upto]
    for f in files[:-keep]:
        f.unlink(missing_ok=True)



# ----------------------------------------------------------------------------------------------
# One writer per run: the run lock
# ----------------------------------------------------------------------------------------------
LOCK_NAME = "run.lock"
#: run directories whose lock this process holds (resolved path -> lock)
_HELD: dict[str, "RunLock"] = {}


def current_job_id() -> str:
    """The id of the scheduler job running this process ('' outside one): submitit's job id (SLURM
    ``<array>_<task>`` or the local executor's), else ``$SLURM_JOB_ID``."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except (ImportError, RuntimeError):
        pass
    arr, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if arr and task:
        return f"{arr}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


class RunLock:
    """An exclusive lock on one run directory: ``<run dir>/run.lock`` created with O_CREAT|O_EXCL.

    ``acquire()`` returns True when this process now holds the lock, False when a live holder has
    it. See the module docstring for when a lock counts as stale. Use as a context manager
    (raises RuntimeError if the lock is held by another) or call acquire/release.
    """

    def __init__(self, path: str | os.PathLike, *, job_id: str | None = None, stale_after_s: float = 1800.0,
                 heartbeat_s: float = 60.0) -> None:
        self.dir = Path(path)
        self.file = self.dir / LOCK_NAME
        self.job_id = current_job_id() if job_id is None else str(job_id)
        self.stale_after_s = check_positive("stale_after_s", stale_after_s)
        self.heartbeat_s = check_positive("heartbeat_s", heartbeat_s)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def info(self) -> dict[str, Any] | None:
        """The holder's record (job_id, host, pid, token, time, heartbeat age), or None if unlocked."""
        try:
            rec = json.loads(self.file.read_text())
            rec["heartbeat_age_s"] = time.time() - self.file.stat().st_mtime
            return rec
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):  # being written right now: treat as held and fresh
            return {"job_id": "", "host": "", "pid": -1, "token": "", "heartbeat_age_s": 0.0}

    def is_stale(self, rec: dict[str, Any]) -> bool:
        if self.job_id and rec.get("job_id") == self.job_id:
            return True  # the same scheduler job, requeued after preemption
        if rec.get("host") == socket.gethostname() and int(rec.get("pid", -1)) > 0 \
                and not pid_alive(int(rec["pid"])):
            return True
        return float(rec.get("heartbeat_age_s", 0.0)) > self.stale_after_s

    def _create(self) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        rec = {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
               "time": time.time()}
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(rec))
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> bool:
        if self.held:
            return True
        for _ in range(3):
            if self._create():
                self.held = True
                _HELD[str(self.dir.resolve())] = self
                self._start_heartbeat()
                return True
            rec = self.info()
            if rec is None:
                continue  # released meanwhile: try again
            if not self.is_stale(rec):
                return False
            # take over: move the stale file away (one contender wins the rename), check it was the
            # one judged stale, and put it back (link fails if a new lock exists) if it was not
            aside = self.file.with_name(f"{LOCK_NAME}.stale.{os.getpid()}.{time.time_ns()}")
            try:
                os.rename(self.file, aside)
            except FileNotFoundError:
                continue
            try:
                moved = json.loads(aside.read_text())
            except (json.JSONDecodeError, OSError):
                moved = {}
            if moved.get("token") != rec.get("token"):
                try:
                    os.link(aside, self.file)
                except FileExistsError:
                    pass
            aside.unlink(missing_ok=True)
        return False

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.file)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, daemon=True, name="nc_lib-run-lock")
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if this process still holds it (a lock taken over by another is left alone)."""
        self._stop.set()
        if not self.held:
            return
        self.held = False
        if _HELD.get(str(self.dir.resolve())) is self:
            del _HELD[str(self.dir.resolve())]
        try:
            if json.loads(self.file.read_text()).get("token") == self.token:
                self.file.unlink(missing_ok=True)
        except (FileNotFoundError, json.JSONDecodeError):
            pass

    def __enter__(self) -> "RunLock":
        if not self.acquire():
            raise RuntimeError(f"run {self.dir} is taken by {self.info()}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe_holder(rec: dict[str, Any] | None) -> str:
    """'process P on host H (job J, heartbeat Ns ago)' of a lock record."""
    if not rec:
        return "another process"
    job = f"job {rec['job_id']}, " if rec.get("job_id") else ""
    return (f"process {rec.get('pid', '?')} on host {rec.get('host') or '?'} ({job}heartbeat "
            f"{float(rec.get('heartbeat_age_s', 0.0)):.0f} s ago)")


@contextmanager
def hold_run_lock(path: Path, *, wait_s: float = 0.0, poll_s: float = 1.0) -> Iterator[RunLock | None]:
    """Hold the lock of run directory ``path`` inside the block (the engine's: one writer per run).

    Nothing to do when this process holds it already (a cluster job around the engine). A lock whose holder
    is dead (on this host) or silent for ``stale_after_s`` is taken over. Held by a live process: waits up to
    ``wait_s`` seconds for it, then raises :class:`RunLockedError` naming that process and host."""
    key = str(Path(path).resolve())
    if key in _HELD and _HELD[key].held:
        yield _HELD[key]
        return
    lock = RunLock(path)
    deadline = time.monotonic() + max(0.0, float(wait_s))
    while not lock.acquire():
        if time.monotonic() >= deadline:
            raise RunLockedError(f"run {path} is being trained by {describe_holder(lock.info())}; wait for it to finish "
                                 "(then this call loads the finished run), or pass wait_for_lock_s to wait here. A lock "
                                 f"whose holder died is taken over; delete {lock.file} only if you are sure no process "
                                 "trains this run.")
        time.sleep(poll_s)
    try:
        yield lock
    finally:
        lock.release()
