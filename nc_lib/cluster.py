"""Grids of runs on a SLURM cluster through submitit, and a dry run that prices a grid first.

One job per configuration, submitted as job arrays (:func:`submit_grid`). Each job trains one
:class:`nc_lib.config.TrainConfig` with :func:`nc_lib.train.train` into the shared run store
(``runs_dir()`` or a path given), so results land where the figure builders read them.

* **Preemption.** :class:`RunJob` is a ``submitit.helpers.Checkpointable``: on preemption or time-out
  submitit calls :meth:`RunJob.checkpoint`, which returns a ``DelayedSubmission`` of the same run;
  the requeued job calls :func:`~nc_lib.train.train` again, which resumes from the run's last
  checkpoint (the engine checkpoints at every measurement epoch).
* **No two jobs take the same run.** Before training, a job creates ``<run dir>/run.lock`` with
  ``os.open(O_CREAT | O_EXCL)`` (atomic on local file systems and NFSv3+): the lock holds the
  job id, host, pid and a heartbeat (its mtime, refreshed by a thread every ``heartbeat_s``). A lock
  is *stale*, and is taken over, when its holder is this same job id (a requeued job), or is on this
  host with a pid that no longer runs, or its heartbeat is older than ``stale_after_s``. Takeover
  renames the stale file away first (only one contender can rename it), then creates a new lock.
* **Finished runs are skipped**, both at submission (not submitted) and in the job (checked
  again after taking the lock).
* **One run on several GPUs.** With ``tasks_per_node=N`` (:func:`make_executor`) and
  ``distributed=True`` (:func:`submit_grid`), each job is N processes, one per GPU, and
  :class:`DistributedRunJob` trains its run data-parallel over them
  (:func:`nc_lib.distributed.train_distributed`; the process group comes from submitit's
  ``TorchDistributedEnvironment``). Rank 0 takes the lock and writes; on preemption the whole job is
  requeued and every rank resumes from the run's last checkpoint.

:func:`dry_run` lists a grid and estimates its device hours from a timed fraction of the first
epoch of each configuration (random inputs of the dataset's shape, so nothing is downloaded),
extrapolated to every epoch and measurement: ``python -m nc_lib.cluster dry-run --paper papyan2020
--scale paper``.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .config import TrainConfig, resolve_device
from .distributed import BACKENDS, backend_for, broadcast_object, submitit_process_group, train_distributed
from .paths import runs_dir as default_runs_dir
from .runs import LOCK_NAME, RunLock, RunResult, current_job_id, is_finished, run_dir
from .train import train
from .validation import check_choice, check_int, check_positive

try:  # submitit is needed only to submit; locks and the dry run work without it
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # pragma: no cover - exercised only where submitit is missing
    submitit = None

    class Checkpointable:  # type: ignore[no-redef]
        """Stand-in so that this module imports without submitit."""

    DelayedSubmission = None  # type: ignore[assignment,misc]

CLUSTERS = ("slurm", "local", "debug")
PAPERS = ("papyan2020", "zhu2021", "markou2024")

#: training-set sizes of the full datasets (used by the dry run when ``per_class`` is None)
TRAIN_SIZES: dict[str, int] = {"mnist": 60000, "fashionmnist": 60000, "cifar10": 50000, "cifar100": 50000,
                               "svhn": 73257, "stl10": 5000, "imagenet": 1281167, "digits": 1497, "mnist1d": 4000}
TEST_SIZES: dict[str, int] = {"mnist": 10000, "fashionmnist": 10000, "cifar10": 10000, "cifar100": 10000,
                              "svhn": 26032, "stl10": 8000, "imagenet": 50000, "digits": 300, "mnist1d": 1000}


def _require_submitit() -> None:
    if submitit is None:
        raise ImportError("nc_lib.cluster needs submitit to submit jobs: pip install submitit")


# ----------------------------------------------------------------------------------------------
# One job = one run
# ----------------------------------------------------------------------------------------------
def _as_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(dict(config))
    raise ValueError(f"config must be a TrainConfig or a dict of its fields; got {type(config).__name__}.")


class _RunsDir:
    """Point ``runs_dir()`` at ``path`` inside a block (jobs run in fresh processes on the cluster)."""

    def __init__(self, path: str | None) -> None:
        self.path, self.old = path, None

    def __enter__(self) -> None:
        if self.path is not None:
            self.old = os.environ.get("NC_RUNS_DIR")
            os.environ["NC_RUNS_DIR"] = str(self.path)

    def __exit__(self, *exc: Any) -> None:
        if self.path is not None:
            if self.old is None:
                os.environ.pop("NC_RUNS_DIR", None)
            else:
                os.environ["NC_RUNS_DIR"] = self.old


class RunJob(Checkpointable):
    """The callable a job runs: ``RunJob(runs_dir)(config_dict) -> summary dict``.

    Takes the run's lock, skips finished runs, trains (resuming from the last checkpoint), and
    returns ``{"status": "trained" | "finished" | "taken" | "stopped", "path", "config_hash",
    "final", "job_id"}``. On preemption submitit calls :meth:`checkpoint`, which requeues the same
    run; the engine resumes it from its checkpoint.
    """

    def __init__(self, runs_dir: str | os.PathLike | None = None, *, stale_after_s: float = 1800.0,
                 heartbeat_s: float = 60.0, stop_after_epochs: int | None = None, threads: int | None = None) -> None:
        self.runs_dir = None if runs_dir is None else str(runs_dir)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.stop_after_epochs = stop_after_epochs
        self.threads = threads

    def __call__(self, config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
        cfg = _as_config(config)
        self._set_threads()
        with _RunsDir(self.runs_dir):
            out, lock = self._claim(cfg)
            if lock is None:
                return out
            try:
                res = train(cfg, progress=False, stop_after_epochs=self.stop_after_epochs)
            finally:
                lock.release()
            return {**out, **_outcome(res)}

    def _set_threads(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))

    def _claim(self, cfg: TrainConfig) -> tuple[dict[str, Any], RunLock | None]:
        """Take the run's lock to train it: (the summary so far, the lock held), or, for a run not to
        train, (its summary: status "finished" or "taken", None)."""
        path = run_dir(cfg)
        out = {"path": str(path), "config_hash": cfg.config_hash(), "job_id": current_job_id()}
        if is_finished(cfg):
            return {**out, "status": "finished", "final": _final(path)}, None
        lock = RunLock(path, stale_after_s=self.stale_after_s, heartbeat_s=self.heartbeat_s)
        if not lock.acquire():
            return {**out, "status": "taken", "holder": lock.info()}, None
        if is_finished(cfg):  # finished by another job between the check and the lock
            lock.release()
            return {**out, "status": "finished", "final": _final(path)}, None
        return out, lock

    def checkpoint(self, config: TrainConfig | Mapping[str, Any]) -> Any:
        """Preempted or timed out: resubmit this same run; it resumes from the engine's checkpoint."""
        _require_submitit()
        return DelayedSubmission(copy.copy(self), config)


class DistributedRunJob(RunJob):
    """The callable every task of a multi-GPU job runs: ``DistributedRunJob(runs_dir)(config_dict)``.

    The job's tasks (one per GPU, ``tasks_per_node`` per node) join one process group
    (:func:`nc_lib.distributed.submitit_process_group`; backend nccl on CUDA, gloo on CPU, or
    ``backend``). Rank 0 skips a finished run or takes its lock, as :class:`RunJob` does, and tells
    the other ranks; then every rank trains the run with
    :func:`nc_lib.distributed.train_distributed`, which resumes from its last checkpoint (rank 0
    writes). Each rank returns :class:`RunJob`'s summary plus ``rank`` and ``world_size``. On
    preemption submitit calls :meth:`checkpoint` on rank 0 and requeues the whole job.
    """

    def __init__(self, runs_dir: str | os.PathLike | None = None, *, backend: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runs_dir, **kwargs)
        self.backend = None if backend is None else check_choice("backend", backend, BACKENDS)

    def __call__(self, config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
        cfg = _as_config(config)
        self._set_threads()
        with _RunsDir(self.runs_dir), \
                submitit_process_group(self.backend or backend_for(resolve_device(cfg.device))) as (rank, world):
            out, lock = self._claim(cfg) if rank == 0 else ({}, None)
            out = {**broadcast_object(out), "rank": rank, "world_size": world}
            if "status" in out:  # finished or taken: no rank trains
                return out
            try:
                res = train_distributed(cfg, stop_after_epochs=self.stop_after_epochs)
            finally:
                if lock is not None:
                    lock.release()
            return {**out, **_outcome(res)}


def _outcome(res: RunResult) -> dict[str, Any]:
    return {"status": "trained" if res.finished else "stopped", "final": res.final}


def _final(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "done.json").read_text()).get("final", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def make_executor(folder: str | os.PathLike, *, cluster: str | None = None, timeout_min: int = 60 * 24,
                  gpus_per_node: int | None = None, cpus_per_task: int = 8, mem_gb: int | None = None,
                  partition: str | None = None, array_parallelism: int = 64, tasks_per_node: int = 1,
                  nodes: int = 1, **slurm_params: Any) -> Any:
    """A ``submitit.AutoExecutor``: SLURM when ``sbatch`` exists, else local.

    cluster: "slurm", "local" (subprocesses on this machine) or "debug" (in this process); None
    lets submitit choose. ``tasks_per_node`` processes per node on ``nodes`` nodes make one job: 1
    for a one-GPU run (:class:`RunJob`), the node's GPU count for a data-parallel run
    (:class:`DistributedRunJob`, ``submit_grid(..., distributed=True)``). gpus_per_node: default one
    per task. ``slurm_params`` are passed as ``slurm_<name>`` (e.g. ``account``, ``qos``,
    ``constraint``); ``array_parallelism`` caps how many jobs of an array run at once.
    """
    _require_submitit()
    if cluster is not None:
        check_choice("cluster", cluster, CLUSTERS)
    tasks_per_node = check_int("tasks_per_node", tasks_per_node, 1)
    nodes = check_int("nodes", nodes, 1)
    gpus_per_node = tasks_per_node if gpus_per_node is None else check_int("gpus_per_node", gpus_per_node, 0)
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if ex.cluster != "slurm" and nodes > 1:
        raise ValueError(f"nodes={nodes} needs cluster='slurm'; the {ex.cluster!r} executor has one node.")
    if ex.cluster == "debug" and tasks_per_node > 1:
        raise ValueError(f"tasks_per_node={tasks_per_node} needs one process per task: choose cluster "
                         "'slurm' or 'local', not 'debug'.")
    params: dict[str, Any] = {"timeout_min": int(timeout_min), "gpus_per_node": gpus_per_node,
                              "cpus_per_task": int(cpus_per_task), "slurm_array_parallelism": int(array_parallelism),
                              "tasks_per_node": tasks_per_node, "nodes": nodes}
    if mem_gb is not None:
        params["mem_gb"] = int(mem_gb)
    if partition is not None:
        params["slurm_partition"] = partition
    params.update({f"slurm_{k}": v for k, v in slurm_params.items()})
    if ex.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        if ex.cluster == "local" and not torch.cuda.is_available():
            params["gpus_per_node"] = 0
    ex.update_parameters(**params)
    return ex


@dataclass
class GridSubmission:
    """What :func:`submit_grid` did: the jobs submitted (one per run to train) and the runs skipped."""

    jobs: list[Any]
    submitted: list[TrainConfig]
    skipped: list[TrainConfig]

    def results(self) -> list[dict[str, Any]]:
        """Wait for every job; their summary dicts (rank 0's for a multi-task job), in submission order."""
        return [job.results()[0] for job in self.jobs]


def _items(configs: Any, prefix: tuple = ()) -> list[tuple[Any, TrainConfig]]:
    """(key, config) pairs of a grid: a mapping (nested mappings too, as zhu2021.grid gives), or
    an iterable of configs (key None)."""
    if isinstance(configs, TrainConfig):
        return [(prefix if prefix else None, configs)]
    if isinstance(configs, Mapping) and not any(f in configs for f in ("dataset", "model")):
        out = []
        for k, v in configs.items():
            out += _items(v, prefix + (k,))
        return out
    if isinstance(configs, Mapping):
        return [(prefix if prefix else None, _as_config(configs))]
    out = []
    for c in configs:
        out += _items(c, prefix)
    return out


def _flatten(configs: Mapping[Any, TrainConfig] | Iterable[TrainConfig]) -> list[TrainConfig]:
    out, seen = [], set()
    for _, c in _items(configs):
        c = _as_config(c)
        if c.config_hash() not in seen:  # two grid entries with the same run: one job
            seen.add(c.config_hash())
            out.append(c)
    return out


def _tasks_per_job(executor: Any) -> int:
    """How many tasks (processes) each job of a submitit executor runs (1 if it does not say)."""
    inner = getattr(executor, "_executor", executor)  # an AutoExecutor wraps the cluster's executor
    try:
        return int(inner._num_tasks())
    except (AttributeError, NotImplementedError, TypeError):
        return 1


def submit_grid(configs: Mapping[Any, TrainConfig] | Iterable[TrainConfig], executor: Any, *,
                runs_dir: str | os.PathLike | None = None, skip_finished: bool = True,
                job: RunJob | None = None, distributed: bool = False) -> GridSubmission:
    """Submit one job per unfinished configuration, as one job array (``executor.map_array``).

    configs: a grid (``papyan2020.grid("paper")``) or any iterable of TrainConfig; duplicates are
    submitted once. executor: from :func:`make_executor` (or any submitit executor). runs_dir: the
    shared run store the jobs write to (default: this process's ``runs_dir()``, which must be on a
    file system every node sees). Finished runs are not submitted. distributed: each job trains its
    run data-parallel over all its tasks (:class:`DistributedRunJob`; make the executor with
    ``tasks_per_node`` = GPUs per node); an executor of several tasks per job needs it.
    """
    _require_submitit()
    if job is None:
        job = DistributedRunJob() if distributed else RunJob()
    if distributed and not isinstance(job, DistributedRunJob):
        raise ValueError(f"distributed=True needs job to be a DistributedRunJob; got {type(job).__name__}.")
    tasks = _tasks_per_job(executor)
    if tasks > 1 and not isinstance(job, DistributedRunJob):
        raise ValueError(f"the executor runs {tasks} tasks per job; pass distributed=True to train each run "
                         "data-parallel over them, or make the executor with tasks_per_node=1.")
    store = str(Path(runs_dir) if runs_dir is not None else default_runs_dir())
    todo, skipped = [], []
    with _RunsDir(store):
        for c in _flatten(configs):
            (skipped if skip_finished and is_finished(c) else todo).append(c)
    if job.runs_dir is None:
        job.runs_dir = store
    jobs = executor.map_array(job, [c.to_dict() for c in todo]) if todo else []
    return GridSubmission(list(jobs), todo, skipped)


def grid_status(configs: Mapping[Any, TrainConfig] | Iterable[TrainConfig], *,
                runs_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Per run: ``hash``, ``dataset``, ``model``, ``state`` ("finished", "running" (locked by a live
    holder), "partial" (checkpointed, not running) or "new"), epochs done, the lock holder if any and
    ``stale_lock`` (a lock left by a dead holder: the run is not running; the next job takes it over)."""
    rows = []
    with _RunsDir(None if runs_dir is None else str(runs_dir)):
        for c in _flatten(configs):
            path = run_dir(c)
            ckpts = sorted((path / "checkpoints").glob("epoch_*.pt"))
            done = int(ckpts[-1].stem.split("_")[1]) if ckpts else 0
            lock = RunLock(path, job_id="")
            holder = lock.info() if (path / LOCK_NAME).exists() else None
            live = holder is not None and not lock.is_stale(holder)  # a dead holder's run is not running
            state = "finished" if is_finished(c) else "running" if live else "partial" if ckpts else "new"
            rows.append({"hash": c.config_hash(), "dataset": c.dataset, "model": c.model, "state": state,
                         "epochs_done": c.epochs if state == "finished" else done, "epochs": c.epochs,
                         "holder": holder, "stale_lock": holder is not None and not live})
    return rows


# ----------------------------------------------------------------------------------------------
# Dry run
# ----------------------------------------------------------------------------------------------
def _dataset_sizes(c: TrainConfig) -> tuple[int, int, int, tuple[int, ...]]:
    from .data import dataset_info

    info = dataset_info(c.dataset, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in c.dataset_kwargs.items()})
    C, shape = int(info["num_classes"]), tuple(int(s) for s in info["input_shape"])
    if c.dataset == "fake":
        n_train, n_test = int(c.dataset_kwargs.get("size", 64)), int(c.dataset_kwargs.get("size", 32))
    elif c.dataset == "gaussian":
        n_train = n_test = C * int(c.dataset_kwargs.get("n_per_class", 100))
    else:
        n_train, n_test = TRAIN_SIZES.get(c.dataset, 50000), TEST_SIZES.get(c.dataset, 10000)
    if c.per_class is not None:
        n_train = min(n_train, C * c.per_class)
    if c.test_per_class is not None:
        n_test = min(n_test, C * c.test_per_class)
    return C, n_train, n_test, shape


def time_config(config: TrainConfig, *, steps: int = 5, warmup: int = 1, device: str | torch.device | None = None,
                eval_steps: int = 2) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) and ``eval_steps`` measurement batches of a
    configuration on random inputs of its dataset's shape, already on the device (the engine's device-resident
    data; its throughput options, bfloat16 training and float32 measurements as the engine runs them), and
    extrapolate to the whole run:

        epoch_s   = step_s * ceil(N_train / batch_size)
        measure_s = eval_s * ceil((N_train [x2 with train_sample_pass] + N_test) / eval_batch_size)
        total_s   = epochs * epoch_s + len(measurement_epochs) * measure_s
    """
    from .config import build_run_model, prepare_for_training, resolve_device, uses_channels_last
    from .features import autocast
    from .train import _make_optimizer

    steps = check_int("steps", steps, 1)
    dev = resolve_device(config.device) if device is None else torch.device(device)
    C, n_train, n_test, shape = _dataset_sizes(config)
    model = prepare_for_training(build_run_model(config, dev, {"num_classes": C, "input_shape": list(shape)}),
                                 config, dev)  # channels_last, compile: as the engine trains it
    opt = _make_optimizer(config, model)
    ce = torch.nn.CrossEntropyLoss()
    B = min(config.batch_size, n_train)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((B, *shape), generator=g).to(dev)
    if uses_channels_last(config, dev, warn=False) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, C, (B,), generator=g).to(dev)
    needs_labels = bool(getattr(model.head, "needs_labels", False))
    amp = config.amp and dev.type == "cuda" and config.optimizer != "lbfgs"

    def step() -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with autocast(dev, amp):
                h = model.body(x)
                loss = ce((model.head(h, y) if needs_labels else model.head(h)).float(), y)
            loss.backward()
            return loss
        if config.optimizer == "lbfgs":
            opt.step(closure)
        else:
            closure()
            opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model.train()
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    model.eval()
    EB = min(config.eval_batch_size, n_train)
    xe = torch.randn((EB, *shape), generator=g).to(dev)
    with torch.no_grad():  # measurements run in float32, also after bfloat16 training
        model(xe)
        sync()
        t0 = time.perf_counter()
        for _ in range(eval_steps):
            model(xe)
        sync()
    eval_s = (time.perf_counter() - t0) / eval_steps
    epoch_s = step_s * math.ceil(n_train / B)
    n_eval = n_train * (2 if config.train_sample_pass else 1) + n_test
    measure_s = eval_s * math.ceil(n_eval / EB)
    n_measure = len(config.measurement_epochs())
    total_s = config.epochs * epoch_s + n_measure * measure_s
    return {"step_s": step_s, "epoch_s": epoch_s, "measure_s": measure_s, "measurements": n_measure,
            "total_s": total_s, "n_train": n_train, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


def dry_run(configs: Mapping[Any, TrainConfig] | Iterable[TrainConfig], *, steps: int = 5,
            device: str | torch.device | None = None, runs_dir: str | os.PathLike | None = None,
            print_table: bool = True) -> list[dict[str, Any]]:
    """List a grid's configurations and estimate the device hours of each from a timed fraction of
    its first epoch (:func:`time_config`). Runs already finished in the store cost nothing, and a run
    the grid lists more than once (the same configuration hash under two keys) is priced once: its
    later rows say ``same as <first key>``.

    Returns one row per run (``key``, ``dataset``, ``model``, ``epochs``, ``batch_size``, ``lr``,
    ``hash``, ``status``, ``epoch_s``, ``measure_s``, ``hours``, ``device``) and prints a table with a
    total (GPU hours when timed on a GPU, CPU hours otherwise). Timings repeat for configurations
    that differ only in optimisation settings (lr, seeds), so each (dataset, model, shape, batch)
    is timed once.
    """
    items = [(k[0] if isinstance(k, tuple) and len(k) == 1 else k, c) for k, c in _items(configs)]
    if not items:
        raise ValueError("configs is empty: give at least one TrainConfig.")
    rows: list[dict[str, Any]] = []
    cache: dict[str, dict[str, Any]] = {}
    first_key: dict[str, str] = {}  # run hash -> the first key that lists it (a grid may list a run twice)
    with _RunsDir(None if runs_dir is None else str(runs_dir)):
        for key, c in items:
            c = _as_config(c)
            timing_key = json.dumps([c.dataset, c.model, c.width, c.feature_dim, c.head, c.model_kwargs,
                                     c.dataset_kwargs, c.batch_size, c.eval_batch_size, c.optimizer, c.amp,
                                     c.per_class, c.test_per_class, c.train_sample_pass], sort_keys=True, default=str)
            if timing_key not in cache:
                t0 = time.perf_counter()
                cache[timing_key] = time_config(c.replace(epochs=1, measure_epochs=None), steps=steps, device=device)
                print(f"timed {len(cache)}: {c.dataset} {c.model} batch {c.batch_size}: "
                      f"{cache[timing_key]['epoch_s']:.4g} s/epoch ({time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr, flush=True)
            t = dict(cache[timing_key])
            n_measure = len(c.measurement_epochs())
            total = c.epochs * t["epoch_s"] + n_measure * t["measure_s"]
            h = c.config_hash()
            status = "finished" if is_finished(c) else f"same as {first_key[h]}" if h in first_key else "todo"
            first_key.setdefault(h, "" if key is None else str(key))
            rows.append({"key": "" if key is None else str(key), "dataset": c.dataset, "model": c.model,
                         "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr, "hash": h,
                         "status": status, "n_train": t["n_train"],
                         "epoch_s": t["epoch_s"], "measure_s": t["measure_s"], "measurements": n_measure,
                         "hours": total / 3600.0 if status == "todo" else 0.0, "device": t["device_name"]})
    if print_table:
        print(format_table(rows))
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The dry run's rows as a plain-text table with a total line."""
    cols = ["key", "dataset", "model", "epochs", "batch_size", "lr", "n_train", "epoch_s", "measure_s", "hours",
            "status", "device"]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    total = sum(r["hours"] for r in rows)
    gpu = any(r["device"] != "cpu" for r in rows)
    todo = sum(r["status"] == "todo" for r in rows)
    repeats = sum(r["status"].startswith("same as") for r in rows)
    lines.append(f"{len(rows)} runs ({todo} to train{f', {repeats} listed twice' if repeats else ''}): {total:.4g} {'GPU' if gpu else 'CPU'} hours "
                 f"(one device per run; timed on {rows[0]['device'] if rows else '-'})")
    return "\n".join(lines)


def run_local(configs: Mapping[Any, TrainConfig] | Iterable[TrainConfig], *, runs_dir: str | os.PathLike | None = None,
              parallelism: int = 1, in_process: bool = False, out: Any = None, tasks_per_node: int = 1,
              folder: str | os.PathLike = "submitit_logs", backend: str | None = None) -> int:
    """Train a grid on this machine, ``parallelism`` runs at a time (each a fresh process with
    cpu_count // parallelism threads; ``in_process``: one after another in this process), printing a line
    per run as it ends. Finished runs are skipped; each run takes its lock (:class:`RunJob`). Returns 0 when
    every run trained or was finished already, else 1.

    tasks_per_node > 1: each run is a job of submitit's local executor (logs in ``folder``) whose
    ``tasks_per_node`` processes train it data-parallel (:class:`DistributedRunJob` with ``backend``), as on
    SLURM.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    out = sys.stdout if out is None else out
    parallelism = check_int("parallelism", parallelism, 1)
    tasks_per_node = check_int("tasks_per_node", tasks_per_node, 1)
    if in_process and tasks_per_node > 1:
        raise ValueError(f"tasks_per_node={tasks_per_node} needs one process per task; in_process=True has one.")
    store = str(Path(runs_dir) if runs_dir is not None else default_runs_dir())
    with _RunsDir(store):
        todo = [c for c in _flatten(configs) if not is_finished(c)]
    n_all = len(_flatten(configs))
    print(f"training {len(todo)} runs on this machine, {parallelism} at a time"
          f"{f' on {tasks_per_node} processes each' if tasks_per_node > 1 else ''} ({n_all - len(todo)} finished "
          f"runs skipped); run store {store}", file=out, flush=True)
    threads = max(1, (os.cpu_count() or 1) // (parallelism * tasks_per_node))
    job = RunJob(store, threads=threads)
    failed = 0
    t0 = time.perf_counter()

    def report(i: int, c: TrainConfig, res: dict[str, Any] | None, err: BaseException | None) -> None:
        nonlocal failed
        what = f"{c.dataset} {c.model} {c.config_hash()}"
        if err is not None or res is None or res.get("status") not in ("trained", "finished"):
            failed += 1
        status = f"failed: {type(err).__name__}: {err}" if err is not None else res.get("status") if res else "?"
        print(f"[{i}/{len(todo)}] {what}: {status} ({time.perf_counter() - t0:.0f} s)", file=out, flush=True)

    if tasks_per_node > 1:
        ex = make_executor(folder, cluster="local", tasks_per_node=tasks_per_node)
        job = DistributedRunJob(store, threads=threads, backend=backend)
        for start in range(0, len(todo), parallelism):
            chunk = todo[start:start + parallelism]
            for i, (c, submitted) in enumerate(zip(chunk, [ex.submit(job, c.to_dict()) for c in chunk]), start + 1):
                try:
                    report(i, c, submitted.results()[0], None)  # rank 0's summary
                except Exception as e:
                    report(i, c, None, e)
    elif in_process:
        for i, c in enumerate(todo, 1):
            try:
                report(i, c, job(c.to_dict()), None)
            except Exception as e:  # one failed run does not stop the grid
                report(i, c, None, e)
    else:
        with ProcessPoolExecutor(max_workers=parallelism, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(job, c.to_dict()): c for c in todo}
            for i, fut in enumerate(as_completed(futures), 1):
                try:
                    report(i, futures[fut], fut.result(), None)
                except Exception as e:
                    report(i, futures[fut], None, e)
    print(f"done: {len(todo) - failed} of {len(todo)} runs trained, {failed} failed.", file=out, flush=True)
    return 0 if failed == 0 else 1


def paper_grid(paper: str, scale: str) -> Mapping[Any, TrainConfig]:
    """``nc_lib.papers.<paper>.grid(scale)``."""
    paper = check_choice("paper", paper, PAPERS)
    mod = importlib.import_module(f"nc_lib.papers.{paper}")
    return mod.grid(scale)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nc_lib.cluster", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("dry-run", "submit", "status"):
        s = sub.add_parser(name)
        s.add_argument("--paper", choices=PAPERS, required=True)
        s.add_argument("--scale", default="quick")
        s.add_argument("--runs-dir", default=None)
        if name == "dry-run":
            s.add_argument("--steps", type=int, default=5)
            s.add_argument("--device", default=None)
            s.add_argument("--json", default=None, help="also write the rows to this JSON file")
        if name == "submit":
            s.add_argument("--folder", default="submitit_logs")
            s.add_argument("--cluster", choices=CLUSTERS, default=None,
                           help="slurm (default where sbatch exists) or local: this machine, "
                                "--array-parallelism runs at a time (default 1)")
            s.add_argument("--timeout-min", type=int, default=60 * 24)
            s.add_argument("--partition", default=None)
            s.add_argument("--tasks-per-node", type=int, default=1,
                           help="processes per node, one per GPU: N > 1 trains each run data-parallel over "
                                "N processes (one preemptible job per run)")
            s.add_argument("--nodes", type=int, default=1, help="nodes per run (SLURM)")
            s.add_argument("--backend", default=None, help="process group backend (default: nccl on CUDA, "
                                                           "gloo on CPU)")
            s.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: one per task)")
            s.add_argument("--cpus", type=int, default=8, help="CPUs per task")
            s.add_argument("--array-parallelism", type=int, default=None,
                           help="runs at a time (default 64 on SLURM, 1 with --cluster local)")
    a = p.parse_args(argv)
    try:
        grid = paper_grid(a.paper, a.scale)
        if a.cmd == "submit":
            cluster = a.cluster
            if cluster in (None, "slurm") and shutil.which("sbatch") is None:
                raise ValueError("SLURM is not available here (no sbatch command), so nothing was submitted. To train "
                                 "the grid on this machine instead, pass --cluster local (one run at a time; "
                                 "--array-parallelism N runs N at once).")
            par = check_int("--array-parallelism", a.array_parallelism if a.array_parallelism is not None
                            else (64 if cluster in (None, "slurm") else 1), 1)
            tasks = check_int("--tasks-per-node", a.tasks_per_node, 1)
            nodes = check_int("--nodes", a.nodes, 1)
            if a.backend is not None:
                check_choice("--backend", a.backend, BACKENDS)
            if cluster == "debug" and tasks > 1:
                raise ValueError(f"--tasks-per-node={tasks} needs one process per task; choose --cluster local "
                                 "or slurm, not debug.")
            if cluster in ("local", "debug") and nodes > 1:
                raise ValueError(f"--nodes={nodes} needs SLURM; --cluster {cluster} has one node.")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.cmd == "submit" and cluster in ("local", "debug"):
        return run_local(grid, runs_dir=a.runs_dir, parallelism=par, in_process=cluster == "debug",
                         tasks_per_node=tasks, folder=a.folder, backend=a.backend)
    if a.cmd == "dry-run":
        rows = dry_run(grid, steps=a.steps, device=a.device, runs_dir=a.runs_dir)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
    elif a.cmd == "submit":
        ex = make_executor(a.folder, cluster="slurm", timeout_min=a.timeout_min, partition=a.partition,
                           gpus_per_node=a.gpus, cpus_per_task=a.cpus, array_parallelism=par,
                           tasks_per_node=tasks, nodes=nodes)
        distributed = tasks * nodes > 1
        job = DistributedRunJob(backend=a.backend) if distributed else None
        sub_ = submit_grid(grid, ex, runs_dir=a.runs_dir, job=job, distributed=distributed)
        print(f"submitted {len(sub_.jobs)} jobs ({len(sub_.skipped)} finished runs skipped): "
              f"{', '.join(j.job_id for j in sub_.jobs[:10])}{' ...' if len(sub_.jobs) > 10 else ''}")
    else:
        for r in grid_status(grid, runs_dir=a.runs_dir):
            print(f"{r['hash']}  {r['dataset']:<12} {r['model']:<10} {r['state']:<8} {r['epochs_done']}/{r['epochs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
