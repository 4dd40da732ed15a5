"""The training engine: train real networks and measure neural collapse while they train.

A run is fully described by a :class:`TrainConfig`. :func:`train` trains it (or loads it when it
has already finished) in a run directory ``runs_dir()/<dataset>-<model>-<hash>`` keyed by a hash
of the configuration, holding

- ``config.json``  the configuration; ``env.json`` versions, device, machine;
- ``metrics.jsonl`` one JSON record per measurement epoch (deterministic numbers only);
- ``timings.jsonl`` wall-clock seconds of training and measuring, per measurement epoch;
- ``checkpoints/epoch_NNNN.pt`` model, optimiser, scheduler, RNG states and epoch, at measurement
  epochs (only the latest is kept unless ``keep_all_checkpoints``);
- ``snapshots/epoch_NNNN.pt`` class means, global mean, classifier (W, b) and the features of a
  fixed sample of training images (20 per class, at most 2000), for the collapse animation;
- ``done.json`` written last: its presence means the run is finished and is loaded, not retrained.

Every write goes to a temporary file first and is moved into place with ``os.replace`` (atomic).
A killed run restarts from its last checkpoint and, on the CPU, reproduces the numbers of an
uninterrupted run exactly: batch order depends only on (seed, epoch) and the RNG states are
restored.

Measurements (Papyan, Han & Donoho 2020, REFERENCE.md section 2), at each measurement epoch, in
eval mode, on the *un-augmented* training set: the penultimate features are streamed through a
forward hook on the head into :class:`nc_lib.metrics.CollapseAccumulator` (no N x p matrix is ever
held), together with the training loss and accuracy; then one pass over the test set gives the
test loss and accuracy and, against the *training* class means, the NCC mismatch, NCC accuracy and
cosine margins (keys ``*_test``). ``train_sample_pass=True`` adds a second training pass for the
per-sample measurements on the training set (NCC mismatch, cosine margin).

Loss: cross-entropy + ``feature_decay``/2 * mean_i ||h_i||^2 on the *raw* penultimate features
(Zhu et al. 2021's lambda_H; their code penalised normalised features, whose gradient is zero) +
weight decay through the optimiser (added to the loss for LBFGS). Heads with ``needs_labels``
(Markou's implicit ETF head) are called as ``head(h, y)`` in training; heads with
``renormalise_after_step`` (Markou's cosine head) get ``head.renormalise_()`` after every step.

Optimisers: SGD (momentum), Adam, LBFGS (strong Wolfe) with a step or multistep lr schedule, and
``optimizer="agd"``, automatic gradient descent (Bernstein et al. 2023, :mod:`nc_lib.agd`; Markou
et al. 2024's released scripts train with it). AGD has no learning rate, schedule or weight decay:
``weight_decay`` (and ``head_weight_decay``) must be 0 and the schedule constant (``schedule="none"``),
else TrainConfig raises ValueError; ``lr``, ``momentum``, ``gamma``, ``step_size`` are unused and
``agd_gain`` scales its steps. AGD updates the weight tensors only: the model's 1-D parameters
(biases, batch-norm scales and shifts) are *frozen*, and a fresh run sets them to 0 (biases) and 1
(normalisation weights), so the network computes what the released scripts' networks (no biases,
``BatchNorm(affine=False)``) compute, then draws AGD's orthogonal initialisation from the seeded RNG;
a resumed run takes both from its checkpoint. The records' ``lr`` is then the epoch's mean
automatic step size eta.

``stratified_batches=True`` draws the training batches with
:class:`nc_lib.nearest_etf.StratifiedBatchSampler` (seeded by ``seed``, epoch set by the engine):
every class is in every batch when num_classes <= batch_size, as Markou et al.'s implicit ETF head
needs; batches are then of balanced size (about N/ceil(N/batch_size)).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .agd import AGD, agd_parameters, reset_frozen_parameters
from .data import DATASETS, dataset_info, load_train_test, make_loader, set_loader_epoch, without_augmentation
from .metrics import CollapseAccumulator, SampleAccumulator
from .models import MODELS, Classifier, build_model
from .paths import runs_dir
from .validation import check_choice, check_int, check_nonnegative, check_positive

OPTIMIZERS = ("sgd", "adam", "lbfgs", "agd")
SCHEDULES = ("none", "step", "multistep")
DEVICES = ("auto", "cpu", "cuda", "mps")

#: Papyan et al.'s measurement epochs out of 350 (their Colab's list, 50 epochs).
PAPYAN_EPOCHS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45,
    50, 54, 59, 65, 71, 77, 85, 92, 101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293, 320, 350)

#: Papyan et al.'s learning-rate grid: 25 log-spaced values in [1e-4, 0.25].
PAPYAN_LRS: tuple[float, ...] = tuple(float(v) for v in np.logspace(math.log10(1e-4), math.log10(0.25), 25))

#: config fields that do not change the numbers of a run (left out of its hash)
UNHASHED_FIELDS = ("keep_all_checkpoints", "eval_batch_size")

#: fields added after runs were stored: left out of the hash while they hold these defaults, so the
#: hash (and run directory) of every configuration written before they existed stays the same
HASHED_UNLESS_DEFAULT: dict[str, Any] = {"stratified_batches": False, "agd_gain": 1.0}


@dataclass
class TrainConfig:
    """Everything that defines a run. Two configs with equal fields share a run directory.

    ``optimizer``: one of :data:`OPTIMIZERS` (``"agd"``: see the module docstring, with
    ``agd_gain``). ``stratified_batches``: every class in every training batch (module docstring).
    """

    # data
    dataset: str = "digits"
    per_class: int | None = None
    test_per_class: int | None = None
    data_seed: int = 0
    augment: bool = False
    random_labels: bool = False
    data_root: str | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    # model
    model: str = "mlp"
    width: float = 1.0
    feature_dim: int | None = None
    head: str = "linear"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_weight_decay: float | None = None
    feature_decay: float = 0.0
    batch_size: int = 128
    stratified_batches: bool = False
    epochs: int = 10
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    step_size: int = 40
    gamma: float = 0.1
    lbfgs_history: int = 10
    agd_gain: float = 1.0
    # measurement
    measure_epochs: tuple[int, ...] | None = None
    train_sample_pass: bool = False
    snapshot_per_class: int = 20
    # execution
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    tag: str = ""
    eval_batch_size: int = 512
    keep_all_checkpoints: bool = False

    def __post_init__(self) -> None:
        self.dataset = check_choice("dataset", str(self.dataset).lower(), DATASETS)
        self.model = check_choice("model", str(self.model).lower(), MODELS)
        self.optimizer = check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.schedule = check_choice("schedule", self.schedule, SCHEDULES)
        self.device = check_choice("device", self.device, DEVICES)
        check_positive("lr", self.lr)
        check_nonnegative("momentum", self.momentum)
        check_nonnegative("weight_decay", self.weight_decay)
        if self.head_weight_decay is not None:
            check_nonnegative("head_weight_decay", self.head_weight_decay)
        check_nonnegative("feature_decay", self.feature_decay)
        check_int("batch_size", self.batch_size, 1)
        check_int("epochs", self.epochs, 1)
        check_int("step_size", self.step_size, 1)
        check_positive("gamma", self.gamma)
        check_int("snapshot_per_class", self.snapshot_per_class, 0)
        self.milestones = tuple(int(m) for m in self.milestones)
        if not isinstance(self.stratified_batches, bool):
            raise ValueError(f"stratified_batches must be True or False, got {self.stratified_batches!r}.")
        self.agd_gain = check_positive("agd_gain", self.agd_gain)
        if not math.isfinite(self.agd_gain):
            raise ValueError(f"agd_gain must be finite, got {self.agd_gain}.")
        if self.optimizer == "agd":
            self._check_agd()
        if self.measure_epochs is not None:
            eps = sorted({check_int("measure_epochs", e, 1, self.epochs) for e in self.measure_epochs})
            self.measure_epochs = tuple(eps)
        self.dataset_kwargs = dict(self.dataset_kwargs)
        self.model_kwargs = dict(self.model_kwargs)
        if "image_size" in self.dataset_kwargs:
            self.dataset_kwargs["image_size"] = list(self.dataset_kwargs["image_size"]) if not isinstance(
                self.dataset_kwargs["image_size"], int) else self.dataset_kwargs["image_size"]

    def _check_agd(self) -> None:
        """AGD has no weight decay and no learning-rate schedule (Bernstein et al. 2023): asking for
        either is an error, not silently ignored. ``lr``, ``momentum``, ``gamma``, ``step_size`` and
        ``lbfgs_history`` are unused by AGD (as momentum is by Adam)."""
        if self.weight_decay != 0:
            raise ValueError(f"weight_decay={self.weight_decay} is not valid with optimizer='agd': AGD has no weight "
                             "decay; set weight_decay=0.")
        if self.head_weight_decay not in (None, 0):
            raise ValueError(f"head_weight_decay={self.head_weight_decay} is not valid with optimizer='agd': AGD has "
                             "no weight decay; set head_weight_decay=None.")
        if self.schedule == "step" or (self.schedule == "multistep" and self.milestones):
            raise ValueError(f"schedule={self.schedule!r} (milestones={list(self.milestones)}, step_size="
                             f"{self.step_size}) is not valid with optimizer='agd': AGD sets its own step size and "
                             "has no learning-rate schedule; set schedule='none'.")

    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["measure_epochs"] = None if self.measure_epochs is None else list(self.measure_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; valid fields: {sorted(known)}.")
        if d.get("measure_epochs") is not None:
            d["measure_epochs"] = tuple(d["measure_epochs"])
        d["milestones"] = tuple(d.get("milestones", ()))
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def config_hash(self) -> str:
        """SHA-256 (first 12 hex digits) of the canonical JSON of every field that changes the numbers
        (fields of :data:`HASHED_UNLESS_DEFAULT` only when they differ from their default)."""
        d = {k: v for k, v in self.to_dict().items() if k not in UNHASHED_FIELDS
             and not (k in HASHED_UNLESS_DEFAULT and v == HASHED_UNLESS_DEFAULT[k])}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def measurement_epochs(self) -> list[int]:
        """The epochs measured (every epoch when ``measure_epochs`` is None); the last epoch always."""
        eps = set(range(1, self.epochs + 1)) if self.measure_epochs is None else set(self.measure_epochs)
        eps.add(self.epochs)
        return sorted(eps)


def papyan_measure_epochs(epochs: int) -> tuple[int, ...]:
    """Papyan's 50 log-spaced measurement epochs of a 350-epoch run, rescaled to ``epochs``.

    e -> round(e * epochs / 350), clipped to [1, epochs], duplicates removed.
    """
    epochs = check_int("epochs", epochs, 1)
    return tuple(sorted({min(epochs, max(1, int(round(e * epochs / 350)))) for e in PAPYAN_EPOCHS}))


def papyan_preset(dataset: str, model: str, *, epochs: int = 350, lr: float = 0.0679, **overrides: Any) -> TrainConfig:
    """Papyan, Han & Donoho's protocol: SGD momentum 0.9, weight decay 5e-4 (1e-4 for ImageNet),
    batch 128, lr x0.1 at epochs/3 and 2 epochs/3, measurements at :func:`papyan_measure_epochs`,
    no augmentation. ``lr`` defaults to their Colab's MNIST value; use :func:`lr_sweep` for the
    paper's choice. ``overrides`` set any other :class:`TrainConfig` field.
    """
    epochs = check_int("epochs", epochs, 1)
    milestones = tuple(sorted({max(1, epochs // 3), max(1, (2 * epochs) // 3)}))
    cfg = dict(dataset=dataset, model=model, optimizer="sgd", lr=lr, momentum=0.9,
               weight_decay=1e-4 if str(dataset).lower() == "imagenet" else 5e-4, batch_size=128,
               epochs=epochs, schedule="multistep", milestones=milestones, gamma=0.1,
               measure_epochs=papyan_measure_epochs(epochs), augment=False)
    cfg.update(overrides)
    return TrainConfig(**cfg)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _atomic_write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    _atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def _atomic_torch_save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_dir(config: TrainConfig) -> Path:
    """The run directory of a configuration: ``runs_dir()/<dataset>-<model>-<hash>``."""
    return runs_dir() / f"{config.dataset}-{config.model}-{config.config_hash()}"


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: cuda if available, else mps, else cpu."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'.")
    return torch.device(device)


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


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
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
        ckpt = _last_checkpoint(self.path)
        if ckpt is None:
            raise FileNotFoundError(f"run {self.path} has no checkpoint yet.")
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model = _build(self.config, torch.device(device) if isinstance(device, str) else device, state.get("model_info"))
        model.load_state_dict(state["model"])
        return model.eval()

    def snapshots(self) -> list[dict[str, Any]]:
        """Per measurement epoch: ``epoch``, ``means`` (C x p), ``global_mean``, ``W``, ``b``,
        ``features`` (k x p, a fixed training sample) and ``labels``."""
        files = sorted((self.path / "snapshots").glob("epoch_*.pt"))
        return [torch.load(f, map_location="cpu", weights_only=False) for f in files]

    def timings(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "timings.jsonl")

    def terminal_phase_onset(self, threshold: float = 1.0) -> int | None:
        """First measured epoch with training accuracy >= ``threshold`` (Papyan's TPT onset;
        use 0.996 for ImageNet)."""
        for r in self.history:
            if r.get("train_accuracy", 0.0) >= threshold:
                return int(r["epoch"])
        return None


def _last_checkpoint(path: Path) -> Path | None:
    files = sorted((path / "checkpoints").glob("epoch_*.pt"))
    return files[-1] if files else None


def run_history(config: TrainConfig) -> list[dict[str, Any]]:
    """The measurement records of a run (finished or not; empty if it never started)."""
    return _read_jsonl(run_dir(config) / "metrics.jsonl")


def load_run(config: TrainConfig) -> RunResult:
    """A finished run from disk; FileNotFoundError if it has not finished (train it with :func:`train`)."""
    path = run_dir(config)
    if not (path / "done.json").exists():
        raise FileNotFoundError(f"no finished run for this configuration in {path}; call nc_lib.train.train(config).")
    return RunResult(config, path, _read_jsonl(path / "metrics.jsonl"), True)


def is_finished(config: TrainConfig) -> bool:
    return (run_dir(config) / "done.json").exists()


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def _build(config: TrainConfig, device: torch.device, info: dict[str, Any] | None = None) -> Classifier:
    if info is None:
        info = dataset_info(config.dataset, **config.dataset_kwargs)
    model = build_model(config.model, num_classes=info["num_classes"], input_shape=tuple(info["input_shape"]),
                        width=config.width, feature_dim=config.feature_dim, head=config.head, **config.model_kwargs)
    return model.to(device)


def _make_optimizer(config: TrainConfig, model: Classifier) -> torch.optim.Optimizer:
    """The optimiser of ``config``. AGD (:class:`nc_lib.agd.AGD`, gain ``agd_gain``) gets the model's
    weight tensors; its 1-D parameters (biases, batch-norm scales and shifts) are frozen here
    (``requires_grad=False``), and :func:`_fresh_start` sets them to 0 / 1 in a fresh run, as in
    the released AGD networks (no biases, ``BatchNorm(affine=False)``)."""
    if config.optimizer == "agd":
        return AGD(agd_parameters(model), gain=config.agd_gain)
    body = [p for p in model.body.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    hwd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
    if config.optimizer == "lbfgs":  # weight decay goes into the closure's loss
        return torch.optim.LBFGS(body + head, lr=config.lr, history_size=config.lbfgs_history,
                                 line_search_fn="strong_wolfe")
    groups = [{"params": body, "weight_decay": config.weight_decay}]
    if head:
        groups.append({"params": head, "weight_decay": hwd})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(groups, lr=config.lr)


class NoSchedule:
    """The scheduler of an optimiser without a learning rate (AGD): ``step`` does nothing, and the
    state dict is empty (checkpoints keep their ``scheduler`` entry)."""

    def step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _make_scheduler(config: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if config.optimizer == "agd":
        return NoSchedule()  # type: ignore[return-value]
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    if config.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def _fresh_start(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """What a fresh run (no checkpoint to resume) does to the built model before its first epoch:
    under AGD, the frozen 1-D parameters take the values of a network without them
    (:func:`nc_lib.agd.reset_frozen_parameters`) and the weights AGD's orthogonal initialisation
    (:meth:`nc_lib.agd.AGD.init_weights`, from the seeded RNG). Nothing for other optimisers."""
    if isinstance(opt, AGD):
        reset_frozen_parameters(model)
        opt.init_weights()
        head = getattr(model, "head", None)
        if getattr(head, "renormalise_after_step", False):  # keep the cosine head's unit rows
            head.renormalise_()


def _rng_state(device: torch.device) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class FeatureTap:
    """Forward hook on ``model.head`` that keeps the head's input (the penultimate features) of the
    latest forward pass; use as a context manager."""

    def __init__(self, model: Classifier) -> None:
        self.model = model
        self.features: Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.features = inputs[0].detach()

    def __enter__(self) -> "FeatureTap":
        self._handle = self.model.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class MeasureReduce(NamedTuple):
    """How :func:`measure` combines its passes across data-parallel ranks (see
    :func:`nc_lib.distributed.measure_distributed`); without one, each process measures alone.

    ``sums(t)``: all-reduce the float64 running sums ``[loss sum, correct, n]`` of a pass;
    ``accumulator(acc)``: merge the ranks' :class:`CollapseAccumulator` in place;
    ``sample_pass(sp)``: merge the ranks' :class:`SampleAccumulator` in place."""

    sums: Callable[[Tensor], Tensor]
    accumulator: Callable[[CollapseAccumulator], CollapseAccumulator]
    sample_pass: Callable[[SampleAccumulator], SampleAccumulator]


def _keep_precision(t: Tensor) -> Tensor:
    """float64 stays float64 (exact reductions of float64 models); lower precisions become float32."""
    return t if t.dtype == torch.float64 else t.float()


def _stream_pass(model: nn.Module, tap: FeatureTap, loader: Iterable, device: torch.device, amp: bool,
                 update: Callable[[Tensor, Tensor], Any], sums: Tensor | None = None) -> None:
    """One eval pass over ``loader``: per batch, the logits ``model(x)``, then ``update(h, y)`` with the
    penultimate features h from ``tap``; with ``sums`` (float64, 3 entries) also adds the summed
    cross-entropy, the number correct and the number of samples into it (on the device: no host
    synchronisation per batch)."""
    ce = nn.CrossEntropyLoss(reduction="sum")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
        if sums is not None:
            logits = _keep_precision(logits)
            sums[0] += ce(logits, y).double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
        update(_keep_precision(tap.features), y)


@torch.no_grad()
def measure(model: Classifier, train_loader: Iterable, test_loader: Iterable | None, num_classes: int,
            device: torch.device, *, train_sample_pass: bool = False, amp: bool = False,
            reduce: MeasureReduce | None = None) -> tuple[dict[str, float], CollapseAccumulator]:
    """Every collapse measurement of ``model`` (eval mode) on the given (un-augmented) loaders.

    Pass 1 (train): features streamed from a forward hook on the head into a CollapseAccumulator,
    plus loss and accuracy. Optional pass 2 (train): per-sample measurements against the final
    means. Pass 3 (test): loss, accuracy, NCC mismatch / accuracy and cosine margin against the
    training means (keys ``*_test``). Features, logits and the classifier stay float64 for float64
    models and are float32 otherwise. ``reduce``: combine each pass across data-parallel ranks
    (:class:`MeasureReduce`; the loaders then hold each rank's shard).
    """
    was_training = model.training
    model.eval()
    acc = CollapseAccumulator(num_classes)
    out: dict[str, float] = {}
    with FeatureTap(model) as tap:
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, n
        _stream_pass(model, tap, train_loader, device, amp, acc.update, sums)
        if reduce is not None:
            sums = reduce.sums(sums)
            acc = reduce.accumulator(acc)
        loss_sum, correct, n = float(sums[0]), float(sums[1]), float(sums[2])
        out["train_loss"] = loss_sum / n
        out["train_accuracy"] = correct / n
        out["train_error"] = 1.0 - correct / n
        W, b = model.head.classifier()
        W = _keep_precision(W)
        b = None if b is None else _keep_precision(b)
        out.update(acc.result(W, b))
        if train_sample_pass:
            sp = acc.sample_pass(W, b)
            _stream_pass(model, tap, train_loader, device, amp, sp.update)
            out.update((sp if reduce is None else reduce.sample_pass(sp)).result())
        if test_loader is not None:
            sp = acc.sample_pass(W, b)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            _stream_pass(model, tap, test_loader, device, amp, sp.update, sums)
            if reduce is not None:
                sums = reduce.sums(sums)
                sp = reduce.sample_pass(sp)
            out["test_loss"] = float(sums[0]) / float(sums[2])
            out.update(sp.result("_test"))
            out["test_accuracy"] = out["accuracy_test"]
            out["test_error"] = 1.0 - out["accuracy_test"]
    model.train(was_training)
    return out, acc


def _snapshot_indices(targets: Tensor, per_class: int, num_classes: int, seed: int) -> Tensor:
    k = min(per_class, max(1, 2000 // num_classes))
    g = torch.Generator().manual_seed(int(seed) + 4242)
    perm = torch.randperm(len(targets), generator=g)
    return torch.cat([perm[targets[perm] == c][:k] for c in range(num_classes)])


@torch.no_grad()
def _snapshot_features(model: Classifier, dataset: Any, idx: Tensor, device: torch.device, batch: int) -> Tensor:
    was = model.training
    model.eval()
    feats = []
    for s in range(0, len(idx), batch):
        part = idx[s:s + batch]
        if hasattr(dataset, "get_batch"):
            x, _ = dataset.get_batch(part)
        else:
            x = torch.stack([dataset[int(i)][0] for i in part])
        feats.append(model.features(x.to(device)).float().cpu())
    model.train(was)
    return torch.cat(feats) if feats else torch.empty(0)


def _to_float(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Tensor):
        return v.item()
    return v


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
def _load_data(config: TrainConfig) -> tuple[Any, Any]:
    """The (train, test) datasets of ``config``."""
    return load_train_test(
        config.dataset, root=config.data_root, per_class=config.per_class, test_per_class=config.test_per_class,
        seed=config.data_seed, augment=config.augment, random_labels=config.random_labels,
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.dataset_kwargs.items()})


def _resume_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                       sched: torch.optim.lr_scheduler.LRScheduler, *, restore_rng: bool = True) -> int:
    """Load the run's last checkpoint into model, optimiser and scheduler (and the RNG states);
    returns its epoch (0 without a checkpoint)."""
    ckpt = _last_checkpoint(path)
    if ckpt is None:
        return 0
    # on the CPU first: RNG states must stay CPU byte tensors; weights and optimiser state are
    # copied to the model's device by load_state_dict
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return int(state["epoch"])


class _Step(nn.Module):
    """body + head in one forward (so DDP sees every parameter): returns (features, logits); heads
    with ``needs_labels`` get the labels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.needs_labels = bool(getattr(model.head, "needs_labels", False))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.model.body(x)
        return h, (self.model.head(h, y) if self.needs_labels else self.model.head(h))


class EpochResult(NamedTuple):
    """Running sums of one training epoch (over all ranks) and the learning rate it used (under
    AGD: the mean of its automatic step size eta over the epoch's steps)."""

    loss_sum: float
    correct: int
    n: int
    lr: float


def train_epoch(model: Classifier, loader: Iterable, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, device: torch.device, epoch: int, *,
                amp: bool = False, forward: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                loss_weight: Callable[[int, Tensor], float] | None = None,
                reduce_sums: Callable[[Tensor], Tensor] | None = None) -> EpochResult:
    """One training epoch of ``model`` (train mode): one pass over ``loader``, then one scheduler step.

    Per batch: h = body(x), logits = head(h) (``head(h, y)`` for heads with ``needs_labels``),
    loss = CE(logits, y) + ``feature_decay``/2 * mean_i ||h_i||^2 (Zhu et al. 2021's lambda_H, on the
    raw features); LBFGS evaluates it in a closure that also adds the weight decays
    (weight_decay/2 * ||theta_body||^2 + head_weight_decay/2 * ||theta_head||^2); then backward, step,
    and ``head.renormalise_()`` for heads with ``renormalise_after_step`` (Markou et al. 2024's cosine head).
    AGD (:class:`nc_lib.agd.AGD`) steps like SGD without a learning rate; the epoch's ``lr`` is then
    the mean of its step sizes eta (every rank computes the same eta from the all-reduced gradients).

    Hooks for data-parallel training: ``forward(x, y) -> (h, logits)`` replaces :class:`_Step` (body + head;
    a DDP wrapper of it); ``loss_weight(i, y)`` multiplies batch i's loss before backward; ``reduce_sums(t)``
    reduces the running float64 sums ``[sum loss * len(y), correct, n]`` (an all-reduce).
    Raises FloatingPointError when the summed loss is not finite.
    """
    model.train()
    ce = nn.CrossEntropyLoss()
    renormalise = bool(getattr(model.head, "renormalise_after_step", False))
    forward = _Step(model) if forward is None else forward
    lbfgs = config.optimizer == "lbfgs"
    if lbfgs:
        body_params = [p for p in model.body.parameters() if p.requires_grad]
        head_params = [p for p in model.head.parameters() if p.requires_grad]
        head_wd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
    agd = isinstance(opt, AGD)
    # running sums stay on the device: no host synchronisation per step
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, n
    eta_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if lbfgs:
            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                h, out = forward(x, y)
                loss = ce(out, y)
                if config.feature_decay > 0:
                    loss = loss + 0.5 * config.feature_decay * h.pow(2).sum(1).mean()
                if config.weight_decay > 0:
                    loss = loss + 0.5 * config.weight_decay * sum(p.pow(2).sum() for p in body_params)
                if head_wd > 0 and head_params:
                    loss = loss + 0.5 * head_wd * sum(p.pow(2).sum() for p in head_params)
                (loss if loss_weight is None else loss * loss_weight(i, y)).backward()
                closure.logits = out.detach()  # type: ignore[attr-defined]
                return loss
            loss = opt.step(closure)
            logits = closure.logits  # type: ignore[attr-defined]
        else:
            opt.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                h, logits = forward(x, y)
                loss = ce(logits.float(), y)
                if config.feature_decay > 0:
                    loss = loss + 0.5 * config.feature_decay * h.float().pow(2).sum(1).mean()
            (loss if loss_weight is None else loss * loss_weight(i, y)).backward()
            opt.step()
            if agd and opt.last_eta is not None:
                eta_sum += opt.last_eta.double()
        steps += 1
        if renormalise:
            with torch.no_grad():
                model.head.renormalise_()
        sums[0] += loss.detach().double() * len(y)
        sums[1] += (logits.detach().argmax(1) == y).sum()
        sums[2] += len(y)
    if reduce_sums is not None:
        sums = reduce_sums(sums)
    loss_sum, correct, n = float(sums[0]), int(sums[1]), int(sums[2])
    lr_used = float(eta_sum) / max(steps, 1) if agd else opt.param_groups[0]["lr"]
    sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not math.isfinite(loss_sum):
        what = f"agd_gain={config.agd_gain}" if agd else f"lr={config.lr}"
        raise FloatingPointError(f"training diverged at epoch {epoch} (loss {loss_sum / max(n, 1)}); lower {what}.")
    return EpochResult(loss_sum, correct, n, lr_used)


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
        self.records = [r for r in _read_jsonl(self.path / "metrics.jsonl") if r["epoch"] <= start]
        self.timings = [t for t in _read_jsonl(self.path / "timings.jsonl") if t["epoch"] <= start]
        if self.write:
            _atomic_write_jsonl(self.path / "metrics.jsonl", self.records)
            _atomic_write_jsonl(self.path / "timings.jsonl", self.timings)

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
                        "features": _snapshot_features(model, self.snapshot_set, self.snapshot_idx, device,
                                                       config.eval_batch_size),
                        "labels": self.snapshot_set.targets[self.snapshot_idx].clone()}
                _atomic_torch_save(path / "snapshots" / f"epoch_{epoch:04d}.pt", snap)
            self.timings.append({"epoch": epoch, "train_s_since_last": self.t_train,
                                 "measure_s": time.perf_counter() - t1, **self.timing_extra})
            # metrics first, then the checkpoint: a run killed in between re-measures nothing twice
            _atomic_write_jsonl(path / "metrics.jsonl", self.records)
            _atomic_write_jsonl(path / "timings.jsonl", self.timings)
            state = {"epoch": epoch, "model_info": self.model_info,
                     "model": model.state_dict() if model_state is None else model_state(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(device)}
            old = list((path / "checkpoints").glob("epoch_*.pt"))
            _atomic_torch_save(path / "checkpoints" / f"epoch_{epoch:04d}.pt", state)
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
            _atomic_write_json(self.path / "done.json", {"epochs": self.config.epochs,
                                                         "final": self.records[-1] if self.records else {}, **extra})


def train(config: TrainConfig, *, progress: bool = True, on_measure: Callable[[dict[str, Any]], None] | None = None,
          stop_after_epochs: int | None = None, retrain: bool = False) -> RunResult:
    """Train ``config`` (or load it if finished), measuring collapse at its measurement epochs.

    progress: tqdm.auto bar over epochs. on_measure: called with every new measurement record
    (e.g. :func:`live_plot`). stop_after_epochs: stop (as if killed) once that many epochs are
    done in total; calling again resumes from the last checkpoint. retrain: delete any earlier
    files of this run and start over.
    """
    path = run_dir(config)
    if retrain and path.exists():
        import shutil

        shutil.rmtree(path)
    if (path / "done.json").exists():
        return load_run(config)
    device = resolve_device(config.device)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path / "config.json", config.to_dict())
    _atomic_write_json(path / "env.json", environment_record(device))

    train_set, test_set = _load_data(config)
    C = train_set.num_classes
    pin = device.type == "cuda"
    # a last batch of one sample would break batch norm in training mode: drop it in that case only
    # (stratified batches have balanced sizes)
    drop_last = len(train_set) % config.batch_size == 1 and len(train_set) > 1 and not config.stratified_batches
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, pin_memory=pin,
                               drop_last=drop_last, stratified=config.stratified_batches)
    eval_train = make_loader(without_augmentation(train_set), config.eval_batch_size, shuffle=False, pin_memory=pin)
    eval_test = make_loader(test_set, config.eval_batch_size, shuffle=False, pin_memory=pin)
    snap_idx = _snapshot_indices(train_set.targets, config.snapshot_per_class, C, config.data_seed) \
        if config.snapshot_per_class > 0 else None

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2 ** 32))
    random.seed(config.seed)
    model_info = {"num_classes": C, "input_shape": list(train_set.input_shape)}
    model = _build(config, device, model_info)
    opt = _make_optimizer(config, model)
    sched = _make_scheduler(config, opt)
    start = _resume_checkpoint(path, model, opt, sched)
    if start == 0:
        _fresh_start(model, opt)
    writer = RunWriter(config, path, model_info, without_augmentation(train_set), snap_idx)
    writer.resume(start)

    use_amp = config.amp and device.type == "cuda" and config.optimizer != "lbfgs"

    def train_one(epoch: int) -> EpochResult:
        set_loader_epoch(train_loader, epoch)
        return train_epoch(model, train_loader, opt, sched, config, device, epoch, amp=use_amp)

    def measure_one(epoch: int, ep: EpochResult) -> None:
        writer.measure(epoch, ep, model, opt, sched, device,
                       lambda: measure(model, eval_train, eval_test, C, device,
                                       train_sample_pass=config.train_sample_pass, amp=use_amp),
                       on_measure=on_measure)

    stopped = run_epochs(config, start, writer, train_one, measure_one, progress=progress,
                         desc=f"{config.model} on {config.dataset}", stop_after_epochs=stop_after_epochs)
    if stopped:
        return RunResult(config, path, writer.records, False)
    writer.finish()
    return RunResult(config, path, writer.records, True)


def run_epochs(config: TrainConfig, start: int, writer: RunWriter, train_one: Callable[[int], EpochResult],
               measure_one: Callable[[int, EpochResult], None], *, progress: bool, desc: str,
               stop_after_epochs: int | None = None) -> bool:
    """The epoch loop of a run, in one process (:func:`train`) or on every rank (:mod:`nc_lib.distributed`):
    epochs ``start + 1 .. config.epochs``, ``train_one(epoch)`` each (its time added to ``writer.t_train``),
    ``measure_one(epoch, result)`` at ``config.measurement_epochs()``, a tqdm bar with ``progress``.
    Returns True when it stopped after ``stop_after_epochs`` (an interrupted run, resumable), else False."""
    measure_at = set(config.measurement_epochs())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=start, desc=desc, unit="epoch")
    try:
        for epoch in range(start + 1, config.epochs + 1):
            if stop_after_epochs is not None and epoch > stop_after_epochs:
                return True
            t0 = time.perf_counter()
            ep = train_one(epoch)
            writer.t_train += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ep.loss_sum / ep.n:.4f}", acc=f"{ep.correct / ep.n:.3f}")
            if epoch in measure_at:
                measure_one(epoch, ep)
    finally:
        if bar is not None:
            bar.close()
    return False


# ----------------------------------------------------------------------------------------------
# Helpers for notebooks
# ----------------------------------------------------------------------------------------------
def live_plot(keys: Sequence[str] = ("train_error", "test_error", "within_class_variability"),
              log_y: bool = True) -> Callable[[dict[str, Any]], None]:
    """An ``on_measure`` callback that shows a live plotly FigureWidget in a notebook (one line per
    key against epoch). Outside a notebook (or without ipywidgets) it does nothing."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or "IPKernelApp" not in shell.config:
            return lambda record: None
        import plotly.graph_objects as go
        from IPython.display import display

        fig = go.FigureWidget(data=[go.Scatter(x=[], y=[], mode="lines+markers", name=k) for k in keys])
        fig.update_layout(xaxis_title="epoch", xaxis_type="log", yaxis_type="log" if log_y else "linear",
                          height=320, margin=dict(l=40, r=10, t=30, b=40))
        display(fig)
    except Exception:  # no notebook front-end: a silent callback
        return lambda record: None

    def update(record: dict[str, Any]) -> None:
        with fig.batch_update():
            for tr, k in zip(fig.data, keys):
                if k in record:
                    v = record[k]
                    tr.x = tuple(tr.x) + (record["epoch"],)
                    tr.y = tuple(tr.y) + (max(v, 1e-12) if log_y else v,)

    return update


def lr_sweep(config: TrainConfig, lrs: Sequence[float] = PAPYAN_LRS, *, progress: bool = True,
             skip_diverged: bool = True) -> dict[str, Any]:
    """Train ``config`` at every learning rate and pick the best final test error (Papyan).

    Returns ``{"best_lr", "best_config", "results": [{"lr", "test_error", "train_error"}]}``. Runs
    that diverge count as test error 1 (with ``skip_diverged``) instead of raising.
    """
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate.")
    results = []
    for lr in lrs:
        cfg = config.replace(lr=float(lr))
        try:
            run = train(cfg, progress=progress)
            final = run.final
            results.append({"lr": float(lr), "test_error": final.get("test_error", 1.0),
                            "train_error": final.get("train_error", 1.0)})
        except FloatingPointError:
            if not skip_diverged:
                raise
            results.append({"lr": float(lr), "test_error": 1.0, "train_error": 1.0, "diverged": True})
    best = min(results, key=lambda r: (r["test_error"], r["lr"]))
    return {"best_lr": best["lr"], "best_config": config.replace(lr=best["lr"]), "results": results}
