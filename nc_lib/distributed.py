"""One large run on several GPUs: data-parallel training whose measurements equal the single-process numbers.

Data-parallel training (DistributedDataParallel) with measurements reduced across ranks, so they equal
the single-process numbers.

Launch with torchrun, one process per GPU::

    torchrun --nproc_per_node=8 -m nc_lib.distributed --config run.json [--runs-dir /shared/runs]

where ``run.json`` holds the fields of a :class:`nc_lib.config.TrainConfig`, or as a preemptible
SLURM job of one task per GPU through submitit (:class:`nc_lib.cluster.DistributedRunJob`, whose
tasks join one process group with :func:`submitit_process_group`)::

    python -m nc_lib.cluster submit --paper papyan2020 --scale paper --tasks-per-node 8

The run lands in the same run directory ``runs_dir()/<dataset>-<model>-<hash>`` with the same files
as :func:`nc_lib.train.train` (config, metrics.jsonl, checkpoints, snapshots, done.json), so
:func:`nc_lib.runs.load_run` and the figure builders read it, and it resumes from its checkpoint
with any number of processes (also one). Rank 0 writes; every rank reads the checkpoint.

Training. The global batch is ``config.batch_size``: epoch e's order is the engine's
(``randperm`` seeded by (seed, e)), each global batch is split into ``world_size`` contiguous
slices, one per rank (:class:`DistributedEpochBatchSampler`), and each rank weights its loss by
``n_rank * world_size / n_batch`` so that DDP's gradient average is the gradient of the global
batch's mean loss. Without batch norm this is the single-process run up to float rounding; batch
norm is converted to SyncBatchNorm on GPUs (statistics of the global batch), and on CPUs (gloo)
each rank normalises its own slice. A last global batch with fewer samples than ranks is dropped.
Augmentation randomness is seeded per (seed, epoch, rank). LBFGS is not supported; AGD is (every
rank draws the same initialisation from the same seed and takes the same step from the averaged
gradients). With ``stratified_batches`` the global batches are the engine's stratified batches,
each dealt out over the ranks by class (:class:`DistributedEpochBatchSampler`). Markou's implicit
ETF head, whose forward depends on the batch's class means, sums its batch statistics over the ranks
(``FeatureMeanTracker.across_ranks``, a differentiable all-reduce), so it sees the global batch as one
process does and its runs are the single-process run up to rounding too.

Measurements. Each rank streams its contiguous shard of the (un-augmented) training and test sets
(:class:`ShardBatchSampler`, no padding, no duplicates) through a
:class:`nc_lib.metrics.CollapseAccumulator`; :func:`reduce_accumulator` then merges the ranks'
float64 state exactly: the class sums and counts are summed, and each rank's shifted sums d_c and
scatter A = sum_i (h_i - k_{y_i})(h_i - k_{y_i})^T are moved to the common shift k_c = global class
mean before summing,

    A' = A + D^T Delta + Delta^T D + Delta^T diag(n) Delta,   d'_c = d_c + n_c delta_c,
    delta_c = k^rank_c - k_c,

so the pooled within-class scatter N Sigma_W = A' - sum_c d'_c d'_c^T / n_c is that of all the data.
The per-sample passes (NCC mismatch, accuracy, cosine margins, loss) reduce their counts and sums
(:func:`reduce_sample_pass`). The passes themselves are :func:`nc_lib.features.measure`'s, given these
reductions (:func:`rank_reduce`). Float64 features give the single-process numbers to ~1e-12; float32
features (the engine's default) to float32 rounding of the per-batch products.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import TrainConfig, build_run_model, load_run_data, place_run_data, prepare_for_training, resolve_device
from .data import ArrayDataset, StratifiedBatchSampler, _batch_identity, epoch_order, without_augmentation
from .features import MeasureReduce, measure, recalibrate_batch_norm, snapshot_indices
from .metrics import CollapseAccumulator, SampleAccumulator
from .nearest_etf import FeatureMeanTracker
from .runs import EpochResult, RunResult, RunWriter, load_run, resume_checkpoint, run_dir, write_run_start
from .train import _fresh_start, _make_optimizer, _make_scheduler, _Step, run_epochs, train_epoch
from .validation import check_choice, check_int

BACKENDS = ("gloo", "nccl")


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend_for(device: torch.device) -> str:
    """The process group's backend for training on ``device``: "nccl" on CUDA, "gloo" otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT); nothing to do for one process. backend: "nccl" on GPUs,
    "gloo" otherwise (default). Returns (rank, world_size, local_rank)."""
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # every GPU visible to each task, or only its own
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend)
    rank, world = rank_and_world()
    return rank, world, local


@contextmanager
def submitit_process_group(backend: str | None = None) -> Iterator[tuple[int, int]]:
    """The process group of a submitit job's tasks (one process per GPU, any number of nodes), for a block.

    submitit's ``TorchDistributedEnvironment`` exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT from the job's environment (SLURM's, or the local executor's); :func:`init_from_env` then
    joins the group (nothing to join for one task). Outside a submitit job the environment is left as it
    is (torchrun's, or none: one process). The group is destroyed when the block ends, also when it ends
    by an exception or by submitit's exit on preemption (a group that existed before is left alone).
    Yields (rank, world_size).
    """
    from submitit.helpers import TorchDistributedEnvironment

    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    try:
        job_env = TorchDistributedEnvironment()
    except RuntimeError:  # submitit finds no job environment: not inside a submitit job
        job_env = None
    if job_env is not None:
        job_env.export(set_cuda_visible_devices=False, overwrite=True)
    ours = not dist.is_initialized()
    try:
        rank, world, _ = init_from_env(backend)
        yield rank, world
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (anything picklable) on every rank; ``obj`` itself without a process group."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_reduce_(t: Tensor) -> Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Reducing the measurements
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def reduce_accumulator(acc: CollapseAccumulator, *, device: torch.device | str | None = None) -> CollapseAccumulator:
    """Merge every rank's :class:`CollapseAccumulator` state in place (all ranks end equal).

    Sums and counts are summed; shifted sums and scatter are re-centred on the common shift (the
    global class means) before summing (module docstring). A rank that saw no samples takes part
    too. ``device``: where to create the state of such a rank (default: cuda under nccl, else cpu).
    """
    rank, world = rank_and_world()
    if world == 1:
        return acc
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    dev = acc.shift.device if acc.shift is not None else torch.device(device)
    p = torch.tensor([-1 if acc.p is None else acc.p], dtype=torch.long, device=dev)
    dist.all_reduce(p, op=dist.ReduceOp.MAX)
    if int(p) < 0:
        raise ValueError("no rank gave any batch to the accumulator.")
    if acc.p is None:
        acc._init(int(p), dev)
    elif acc.p != int(p):
        raise ValueError(f"ranks disagree on the feature dimension: {acc.p} here, {int(p)} on another rank.")
    n_local = acc.counts.to(torch.float64)
    counts = acc.counts.clone()
    dist.all_reduce(counts)
    sums = acc.shifted_sums + n_local[:, None] * acc.shift  # this rank's class sums
    dist.all_reduce(sums)
    seen = counts > 0
    k = torch.zeros_like(sums)
    k[seen] = sums[seen] / counts[seen, None].to(torch.float64)
    delta = torch.where((n_local > 0)[:, None], acc.shift - k, torch.zeros_like(k))
    D = acc.shifted_sums
    scatter = acc.scatter  # None for an accumulator without scatter (keep_scatter=False)
    if scatter is not None:
        cross = D.T @ delta
        scatter = scatter + cross + cross.T + delta.T @ (n_local[:, None] * delta)
        dist.all_reduce(scatter)
    shifted = D + n_local[:, None] * delta
    dist.all_reduce(shifted)
    acc.counts, acc.shift, acc.shifted_sums, acc.scatter, acc.seen = counts, k, shifted, scatter, seen
    acc._shift_cast = k
    return acc


@torch.no_grad()
def reduce_sample_pass(sp: SampleAccumulator) -> SampleAccumulator:
    """Sum the per-sample counts and sums of a :class:`SampleAccumulator` over ranks, in place."""
    if rank_and_world()[1] == 1:
        return sp
    if sp.margins is not None:
        raise ValueError("keep_margins=True is not supported across ranks; gather the margins yourself.")
    dev = sp.means.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([sp.n, sp.ncc_agree, sp.ncc_correct, sp.correct, sp.margin_sum, sp.nc1_sum],
                     dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    sp.n, sp.ncc_agree, sp.ncc_correct, sp.correct = (int(round(float(v))) for v in t[:4])
    sp.margin_sum, sp.nc1_sum = float(t[4]), float(t[5])
    return sp


def rank_reduce(device: torch.device) -> MeasureReduce:
    """The reductions across ranks of :func:`nc_lib.features.measure`'s passes: running sums all-reduced
    (on the CPU under gloo), :func:`reduce_accumulator`, :func:`reduce_sample_pass`."""
    red_dev = device if (rank_and_world()[1] == 1 or dist.get_backend() == "nccl") else torch.device("cpu")
    return MeasureReduce(sums=lambda t: _all_reduce_(t.to(red_dev)),
                         accumulator=lambda acc: reduce_accumulator(acc, device=device),
                         sample_pass=reduce_sample_pass)


def measure_distributed(model: nn.Module, train_loader: Iterable, test_loader: Iterable | None, num_classes: int,
                        device: torch.device, *, train_sample_pass: bool = False,
                        amp: bool = False) -> tuple[dict[str, float], CollapseAccumulator]:
    """:func:`nc_lib.features.measure` over sharded loaders, reduced across ranks (every rank gets
    the same numbers): the same passes, with :func:`rank_reduce` combining them. With one process
    it is the single-process measurement; float64 models keep float64 features throughout."""
    return measure(model, train_loader, test_loader, num_classes, device, train_sample_pass=train_sample_pass,
                   amp=amp, reduce=rank_reduce(device))


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------
def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous shard of ``range(n)`` that rank ``rank`` of ``world`` measures (sizes differ by
    at most one; no padding, no duplicates)."""
    return range(rank * n // world, (rank + 1) * n // world)


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of this rank's contiguous shard of a dataset, in order (for measurements)."""

    def __init__(self, n: int, batch_size: int, rank: int | None = None, world: int | None = None) -> None:
        r, w = rank_and_world()
        self.indices = shard_range(n, r if rank is None else rank, w if world is None else world)
        self.batch_size = check_int("batch_size", batch_size, 1)

    def __iter__(self) -> Iterator[list[int]]:
        idx = list(self.indices)
        for s in range(0, len(idx), self.batch_size):
            yield idx[s:s + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)


class DistributedEpochBatchSampler(Sampler[list[int]]):
    """This rank's slice of each global batch of the single-process engine's batches.

    Epoch e: ``randperm(n)`` seeded by ``seed * 1_000_003 + e`` (the engine's order,
    :class:`nc_lib.data.EpochBatchSampler`), cut into global batches of ``batch_size``; rank r takes
    the r-th of ``world`` contiguous slices of each.

    ``labels`` given (the engine's ``stratified_batches=True``): the global batches are those of
    :class:`nc_lib.data.StratifiedBatchSampler` (labels, batch_size, seed) at epoch e, the
    single-process engine's batches, so every class is in every global batch when
    num_classes <= batch_size. Each global batch is sorted by class (stably) and dealt out in turn,
    rank r taking positions r, r + world, ... of the sorted batch (its slice then keeps the global
    batch's order, so one process sees exactly the engine's batches): a class with at least
    ``world`` samples in the global batch reaches every rank's slice (what a head computing
    per-batch class means needs on each rank).

    Global batches with fewer than ``world`` samples are dropped (every rank needs a sample).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world: int | None = None, labels: Sequence[int] | Tensor | None = None) -> None:
        r, w = rank_and_world()
        self.n, self.seed, self.shuffle = n, int(seed), shuffle
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.batch_size = check_int("batch_size", batch_size, self.world)
        self.epoch = 0
        self.labels: Tensor | None = None
        self._stratified: StratifiedBatchSampler | None = None
        if labels is not None:
            self.labels = torch.as_tensor(labels).long().reshape(-1)
            if self.labels.numel() != n:
                raise ValueError(f"labels must hold one label per sample: {self.labels.numel()} labels for n={n}.")
            if not shuffle:
                raise ValueError("shuffle=False is not valid with labels (stratified batches are shuffled).")
            self._stratified = StratifiedBatchSampler(self.labels, self.batch_size, seed=self.seed)
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """The global batches of the current epoch (at least ``world`` samples each), in order."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        if self._stratified is not None:
            self._stratified.set_epoch(self.epoch)
            batches = self._stratified.batches()
        else:
            order = epoch_order(self.n, self.shuffle, self.seed, self.epoch)
            batches = [order[s:s + self.batch_size] for s in range(0, self.n, self.batch_size)]
        batches = [b for b in batches if len(b) >= self.world]
        self._cache = (self.epoch, batches)
        return batches

    def global_sizes(self) -> list[int]:
        """Sizes of the global batches this epoch yields, in order."""
        return [len(b) for b in self.global_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            if self.labels is not None:
                idx = torch.tensor(batch)
                mine = torch.argsort(self.labels[idx], stable=True)[self.rank::self.world]
                yield idx[torch.sort(mine).values].tolist()  # in the global batch's order
            else:
                yield batch[self.rank * len(batch) // self.world:(self.rank + 1) * len(batch) // self.world]

    def __len__(self) -> int:
        return len(self.global_batches())


def _loader(dataset: Dataset, sampler: Sampler, pin: bool = False) -> DataLoader:
    if isinstance(dataset, ArrayDataset) and dataset.device.type != "cpu":
        pin = False  # device-resident: batches are indexed where they live (as nc_lib.data.make_loader does)
    kwargs: dict[str, Any] = {"batch_sampler": sampler, "pin_memory": pin}
    if isinstance(dataset, ArrayDataset):
        kwargs["collate_fn"] = _batch_identity
    return DataLoader(dataset, **kwargs)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics) before measuring."""
    if rank_and_world()[1] > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def train_distributed(config: TrainConfig, *, progress: bool = False, stop_after_epochs: int | None = None,
                      sync_batchnorm: bool | None = None) -> RunResult:
    """Train ``config`` data-parallel over the initialised process group (or in one process).

    Same run directory, files and checkpoints as :func:`nc_lib.train.train`, through the same
    epoch step (:func:`nc_lib.train.train_epoch`, with a per-rank loss weight and all-reduced
    running sums) and measurement writer (:class:`nc_lib.runs.RunWriter`, rank 0 writes); a
    finished run is loaded, a partial one resumes from its last checkpoint. sync_batchnorm:
    SyncBatchNorm (default: on GPUs). stop_after_epochs: stop once that many epochs are done (as if killed).
    """
    if config.optimizer == "lbfgs":
        raise ValueError("optimizer='lbfgs' is not supported in data-parallel training; choose one of "
                         "['sgd', 'adam', 'agd'].")
    rank, world = rank_and_world()
    if config.precise_bn and world > 1:
        raise ValueError("precise_bn=True is supported in one process only (the quick scales' setting; each rank "
                         f"would recompute batch-norm statistics from its own shard): got {world} processes. Set "
                         "precise_bn=False or train in one process.")
    path = run_dir(config)
    if (path / "done.json").exists():
        return load_run(config)
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if rank == 0:
        write_run_start(path, config, device, world_size=world, backend=dist.get_backend() if world > 1 else None,
                        launcher="nc_lib.distributed")
    train_set, test_set = place_run_data(config, load_run_data(config), device)
    C = train_set.num_classes
    pin = device.type == "cuda"  # host-resident batches only (_loader drops it for device-resident data)
    sampler = DistributedEpochBatchSampler(len(train_set), config.batch_size, seed=config.seed,
                                           labels=train_set.targets if config.stratified_batches else None)
    train_loader = _loader(train_set, sampler, pin)
    eval_set = without_augmentation(train_set)
    eval_train = _loader(eval_set, ShardBatchSampler(len(eval_set), config.eval_batch_size), pin)
    eval_test = _loader(test_set, ShardBatchSampler(len(test_set), config.eval_batch_size), pin)
    snap_idx = snapshot_indices(train_set.targets, config.snapshot_per_class, C, config.data_seed) \
        if config.snapshot_per_class > 0 else None

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2 ** 32))
    model_info = {"num_classes": C, "input_shape": list(train_set.input_shape)}
    model = build_run_model(config, device, model_info)
    if sync_batchnorm is None:
        sync_batchnorm = device.type == "cuda" and world > 1
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = prepare_for_training(model, config, device)
    opt = _make_optimizer(config, model)
    sched = _make_scheduler(config, opt)
    _barrier()  # rank 0 has made the directory
    start = resume_checkpoint(path, model, opt, sched, restore_rng=False)
    if start == 0:
        _fresh_start(model, opt)  # AGD's initialisation: the same on every rank (same seed)
    writer = RunWriter(config, path, model_info, eval_set, snap_idx, write=rank == 0,
                       timing_extra={"world_size": world})
    writer.resume(start)
    _barrier()

    for m in model.modules():  # Markou's implicit head: track the global batch's class means on every rank
        if isinstance(m, FeatureMeanTracker):
            m.across_ranks = world > 1
    step = _Step(model)
    ddp: nn.Module = step
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = config.amp and device.type == "cuda"
    red_dev = device if (world == 1 or dist.get_backend() == "nccl") else torch.device("cpu")
    reduce = rank_reduce(device)

    def measure_fn() -> tuple[dict[str, float], CollapseAccumulator]:
        if config.precise_bn:  # one process only (checked above)
            recalibrate_batch_norm(model, eval_train, device)
        _sync_buffers(model)
        return measure(model, eval_train, eval_test, C, device, train_sample_pass=config.train_sample_pass,
                       reduce=reduce)  # float32 always, also after bfloat16 training

    def train_one(epoch: int) -> EpochResult:
        torch.manual_seed(config.seed * 1_000_003 + epoch * 1009 + rank)  # augmentation: per (seed, epoch, rank)
        sampler.set_epoch(epoch)
        global_sizes = sampler.global_sizes()
        # DDP averages the ranks' gradients: weight n_rank * world / n_batch gives the global batch's mean loss
        return train_epoch(model, train_loader, opt, sched, config, device, epoch, amp=use_amp, forward=ddp,
                           loss_weight=lambda i, y: len(y) * world / global_sizes[i],
                           reduce_sums=lambda t: _all_reduce_(t.to(red_dev)))

    def measure_one(epoch: int, ep: EpochResult) -> None:
        writer.measure(epoch, ep, model, opt, sched, device, measure_fn, model_state=lambda: _plain_state(model))
        _barrier()

    stopped = run_epochs(config, start, writer, train_one, measure_one, progress=progress and rank == 0,
                         desc=f"{config.model} on {config.dataset} x{world}", stop_after_epochs=stop_after_epochs)
    if stopped:
        _barrier()
        return RunResult(config, path, writer.records, False)
    writer.finish(world_size=world)
    _barrier()
    return RunResult(config, path, writer.records, True)


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict (SyncBatchNorm keeps BatchNorm's keys: loadable by a plain model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def load_config(spec: str) -> TrainConfig:
    """A TrainConfig from a JSON file path or an inline JSON object."""
    text = spec if spec.lstrip()[:1] in ("{", "[") else Path(spec).read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config must be a JSON object of TrainConfig fields (file or inline): {e}") from e
    if not isinstance(d, dict):
        raise ValueError("config must be a JSON object of TrainConfig fields.")
    return TrainConfig.from_dict(d)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m nc_lib.distributed",
                                description="Data-parallel training of one nc_lib run.")
    p.add_argument("--config", required=True, help="JSON file (or inline JSON) with TrainConfig fields")
    p.add_argument("--runs-dir", default=None, help="the run store (default: $NC_RUNS_DIR or runs/)")
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument("--stop-after-epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (CPU)")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    if a.runs_dir:
        os.environ["NC_RUNS_DIR"] = str(a.runs_dir)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = load_config(a.config)
    rank, world, _ = init_from_env(a.backend)
    try:
        res = train_distributed(config, progress=a.progress, stop_after_epochs=a.stop_after_epochs)
        if rank == 0:
            print(json.dumps({"path": str(res.path), "finished": res.finished, "world_size": world,
                              "final": res.final}, default=str))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
