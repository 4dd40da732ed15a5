"""The run configuration: :class:`TrainConfig`, everything that defines a training run, and what it names.

A configuration is validated when it is made (bad values raise a ValueError naming the field and the
valid choices) and hashed for its run directory (:meth:`TrainConfig.config_hash`, see
:mod:`nc_lib.runs`). It also names the device, the data and the model of the run:
:func:`resolve_device`, :func:`load_run_data` and :func:`build_run_model` turn it into them, the same
way for the engine (:mod:`nc_lib.train`), data-parallel runs (:mod:`nc_lib.distributed`), the cluster's
dry runs and the paper modules.

Papyan, Han & Donoho (2020)'s protocol is :func:`papyan_preset`, with their measurement epochs
(:data:`PAPYAN_EPOCHS`, :func:`papyan_measure_epochs`) and learning-rate grid (:data:`PAPYAN_LRS`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import DATASETS, IMBALANCE_PROFILES, dataset_info, imbalanced_counts, load_train_test
from .models import HEADS, MODEL_OPTIONS, MODELS, Classifier, build_model, model_family
from .validation import check_choice, check_int, check_nonnegative, check_positive

OPTIMIZERS = ("sgd", "adam", "lbfgs", "agd")
#: training losses: cross-entropy, or the squared loss on one-hot targets (Papyan's Colab; Han et al. 2022)
LOSSES = ("ce", "mse")
SCHEDULES = ("none", "step", "multistep")
DEVICES = ("auto", "cpu", "cuda", "mps")

#: Papyan et al.'s measurement epochs out of 350 (their Colab's list, 50 epochs).
PAPYAN_EPOCHS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45,
    50, 54, 59, 65, 71, 77, 85, 92, 101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293, 320, 350)

#: Papyan et al.'s learning-rate grid: 25 log-spaced values in [1e-4, 0.25].
PAPYAN_LRS: tuple[float, ...] = tuple(float(v) for v in np.logspace(math.log10(1e-4), math.log10(0.25), 25))

#: config fields that do not change the numbers of a run (left out of its hash)
UNHASHED_FIELDS = ("keep_all_checkpoints", "eval_batch_size", "data_placement")

#: where an in-memory dataset is served from (``TrainConfig.data_placement``): "auto" holds it on the training
#: device when its raw arrays fit in :data:`DEVICE_DATA_FRACTION` of the device's free memory (always on the CPU,
#: where it already lives), "device" always, "host" keeps it in host memory (batches copied per step)
DATA_PLACEMENTS = ("auto", "device", "host")
#: the largest share of an accelerator's free memory that ``data_placement="auto"`` fills with a run's data
DEVICE_DATA_FRACTION = 0.25

#: fields added after runs were stored: left out of the hash while they hold these defaults, so the
#: hash (and run directory) of every configuration written before they existed stays the same
HASHED_UNLESS_DEFAULT: dict[str, Any] = {"stratified_batches": False, "agd_gain": 1.0, "loss": "ce",
                                         "class_counts": None, "imbalance_ratio": 1.0,
                                         "imbalance_profile": "step", "channels_last": False, "compile": False,
                                         "precise_bn": False}


@dataclass
class TrainConfig:
    """Everything that defines a run. Two configs with equal fields share a run directory.

    ``optimizer``: one of :data:`OPTIMIZERS` (``"agd"``: see :mod:`nc_lib.train`, with
    ``agd_gain``). ``stratified_batches``: every class in every training batch (:mod:`nc_lib.train`).
    ``precise_bn``: before each measurement, recompute every batch-norm layer's statistics from the
    (un-augmented) training set (:func:`nc_lib.features.recalibrate_batch_norm`) instead of measuring with
    the running averages; the training trajectory is unchanged (training-mode batch norm never reads them).
    Papyan's protocol leaves it off; the quick scales turn it on (2 steps per epoch).

    Throughput (none changes what a run measures; Papyan's protocol is the default float32 path):
    ``amp``: bfloat16 autocast of the training passes on CUDA (measurements always run in float32).
    ``channels_last``: convolutional networks and their inputs in NHWC memory order. ``compile``:
    ``torch.compile`` of the network's body for training. ``data_placement``: see :data:`DATA_PLACEMENTS`
    and :func:`place_run_data` (the same batches either way, so it is not part of the run's hash).
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
    class_counts: tuple[int, ...] | None = None
    imbalance_ratio: float = 1.0
    imbalance_profile: str = "step"
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
    loss: str = "ce"
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
    precise_bn: bool = False
    # execution
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    data_placement: str = "auto"
    tag: str = ""
    eval_batch_size: int = 512
    keep_all_checkpoints: bool = False

    def __post_init__(self) -> None:
        self.dataset = check_choice("dataset", str(self.dataset).lower(), DATASETS)
        self.model = check_choice("model", str(self.model).lower(), MODELS)
        self.optimizer = check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.schedule = check_choice("schedule", self.schedule, SCHEDULES)
        self.device = check_choice("device", self.device, DEVICES)
        self.data_placement = check_choice("data_placement", self.data_placement, DATA_PLACEMENTS)
        for flag in ("amp", "channels_last", "compile", "augment", "random_labels", "keep_all_checkpoints",
                     "precise_bn"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
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
        self._check_fields()
        self._check_loss_and_imbalance()
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

    def _check_loss_and_imbalance(self) -> None:
        """``loss`` in :data:`LOSSES`; an imbalanced training set is given by ``class_counts`` (one count per
        class) or by ``imbalance_ratio`` >= 1 with ``imbalance_profile`` (:func:`nc_lib.data.imbalanced_counts`,
        n_max = ``per_class``), not both."""
        self.loss = check_choice("loss", self.loss, LOSSES)
        self.imbalance_profile = check_choice("imbalance_profile", self.imbalance_profile, IMBALANCE_PROFILES)
        self.imbalance_ratio = float(check_positive("imbalance_ratio", self.imbalance_ratio))
        if not math.isfinite(self.imbalance_ratio) or self.imbalance_ratio < 1:
            raise ValueError(f"imbalance_ratio must be a finite number >= 1 (n_max / n_min), got {self.imbalance_ratio}.")
        if self.class_counts is not None:
            self.class_counts = tuple(check_int("class_counts", k, 1) for k in self.class_counts)
            if self.imbalance_ratio != 1.0:
                raise ValueError("give class_counts or imbalance_ratio, not both.")
            if self.per_class is not None:
                raise ValueError("give class_counts or per_class, not both (class_counts sets every class's count).")
        elif self.imbalance_ratio != 1.0 and self.per_class is None:
            raise ValueError("imbalance_ratio needs per_class (the largest class's count, n_max).")

    def train_counts(self, num_classes: int) -> int | list[int] | None:
        """The per-class training counts: ``per_class`` (balanced), ``class_counts``, or the counts of
        ``imbalance_ratio`` / ``imbalance_profile``; None keeps the whole training set."""
        if self.class_counts is not None:
            return list(self.class_counts)
        if self.imbalance_ratio != 1.0:
            return imbalanced_counts(self.per_class, num_classes, self.imbalance_ratio, self.imbalance_profile)
        return self.per_class

    def _check_fields(self) -> None:
        """The fields the engine would otherwise trip on only inside ``train()`` (after making the run's
        directory): sizes, seeds, the head, the model's options, momentum in [0, 1), and batch norm with
        batches of one sample."""
        width = check_positive("width", self.width)
        if not math.isfinite(width):
            raise ValueError(f"width must be a finite number > 0, got {self.width}.")
        for name in ("per_class", "test_per_class", "feature_dim"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("lbfgs_history", self.lbfgs_history, 1)
        check_int("seed", self.seed, 0)
        check_int("data_seed", self.data_seed, 0)
        m = check_nonnegative("momentum", self.momentum)
        if m >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}: momentum >= 1 makes SGD's steps grow "
                             "without bound.")
        check_choice("head", self.head, sorted(HEADS))
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict of options, got {self.model_kwargs!r}.")
        family = model_family(self.model)
        unknown = sorted(set(self.model_kwargs) - MODEL_OPTIONS[family])
        if unknown:
            raise ValueError(f"model_kwargs has unknown option(s) {unknown} for model={self.model!r}; valid options: "
                             f"{sorted(MODEL_OPTIONS[family])}.")
        batch_norm = family != "mlp" or bool(self.model_kwargs.get("batch_norm", True))
        if batch_norm and self.batch_size == 1:
            raise ValueError(f"batch_size=1 is not valid with model={self.model!r}: its batch norm needs at least 2 "
                             "samples per training batch; use batch_size >= 2"
                             + (" or model_kwargs={'batch_norm': False}." if family == "mlp" else "."))

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
    no augmentation. ``lr`` defaults to their Colab's MNIST value; use :func:`nc_lib.train.lr_sweep` for the
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


def load_run_data(config: TrainConfig, *, augment: bool | None = None) -> tuple[Any, Any]:
    """The (train, test) datasets of ``config`` (:func:`nc_lib.data.load_train_test` with its data fields).

    ``augment``: override ``config.augment`` (e.g. False to read the training set as measured)."""
    return load_train_test(
        config.dataset, root=config.data_root, test_per_class=config.test_per_class,
        per_class=config.train_counts(dataset_info(config.dataset, **config.dataset_kwargs)["num_classes"]),
        seed=config.data_seed, augment=config.augment if augment is None else augment,
        random_labels=config.random_labels,
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.dataset_kwargs.items()})


def build_run_model(config: TrainConfig, device: torch.device, info: dict[str, Any] | None = None) -> Classifier:
    """The network of ``config`` on ``device``. ``info``: ``{"num_classes", "input_shape"}`` (a checkpoint's
    ``model_info``); default :func:`nc_lib.data.dataset_info` of the config's dataset."""
    if info is None:
        info = dataset_info(config.dataset, **config.dataset_kwargs)
    model = build_model(config.model, num_classes=info["num_classes"], input_shape=tuple(info["input_shape"]),
                        width=config.width, feature_dim=config.feature_dim, head=config.head, **config.model_kwargs)
    return model.to(device)


def grid_amp(scale: str, amp: bool | None) -> bool:
    """Whether a paper's grid at ``scale`` trains with bfloat16 autocast (``TrainConfig.amp``): ``amp`` when
    given, else True at the paper scale (GPU runs; every measurement still in float32) and False at the quick and
    medium scales, which keep the papers' float32 protocol. ``amp=False`` at paper scale is Papyan's float32."""
    if amp is not None and not isinstance(amp, bool):
        raise ValueError(f"amp must be True, False or None (the scale's default), got {amp!r}.")
    return scale == "paper" if amp is None else amp


def data_bytes(dataset: Any) -> int:
    """Bytes of an in-memory dataset's raw arrays (inputs and labels); 0 for one read from files."""
    from .data import ArrayDataset

    if not isinstance(dataset, ArrayDataset):
        return 0
    return dataset.raw.numel() * dataset.raw.element_size() + dataset.targets.numel() * 8


def place_run_data(config: TrainConfig, datasets: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    """``datasets`` where ``config.data_placement`` serves them from (:data:`DATA_PLACEMENTS`).

    In-memory datasets (:class:`nc_lib.data.ArrayDataset`: every dataset but ImageNet) move to ``device``
    as their raw arrays (uint8 images stay uint8); batches are then indexed, standardised and augmented
    there, with no host-to-device copy per step and no DataLoader workers. The batches are the same
    numbers either way: the order is a function of (seed, epoch), the augmentation draws from the CPU
    generator. "auto" moves them when together they fit in :data:`DEVICE_DATA_FRACTION` of the device's
    free memory; on the CPU they already live where they are served. "device" moves them always (a
    ValueError for a dataset read from files); "host" never."""
    from .data import ArrayDataset

    in_memory = all(isinstance(d, ArrayDataset) for d in datasets)
    if config.data_placement == "device" and not in_memory:
        raise ValueError(f"data_placement='device' needs in-memory datasets; dataset {config.dataset!r} is read from "
                         "files; use data_placement='auto' or 'host'.")
    if config.data_placement == "host" or device.type == "cpu" or not in_memory:
        return datasets
    if config.data_placement == "auto":
        if device.type != "cuda":
            return datasets  # e.g. MPS, which cannot say how much memory is free: the host path unless asked
        free, _ = torch.cuda.mem_get_info(device)
        if sum(data_bytes(d) for d in datasets) > DEVICE_DATA_FRACTION * free:
            return datasets
    return tuple(d.to(device) for d in datasets)


def uses_channels_last(config: TrainConfig, device: torch.device, *, warn: bool = True) -> bool:
    """Whether a run trains in NHWC: ``channels_last`` set, a convolutional family, and a CUDA device.

    On the CPU the option is ignored with a warning (the run trains in NCHW): with torch 2.14.1 on a 2-core
    AMD EPYC, NHWC training of a small ResNet18 aborted with heap corruption in the backward pass on one
    thread and gave other numbers than NCHW on two (final NC1 4.13 against 3.33)."""
    if not config.channels_last or model_family(config.model) == "mlp":
        return False
    if torch.device(device).type != "cuda":
        if warn:
            warnings.warn("channels_last applies on CUDA only: on the CPU, torch's NHWC kernels corrupted memory and "
                          "changed the numbers in our tests, so this run trains in NCHW.", stacklevel=2)
        return False
    return True


def prepare_for_training(model: Classifier, config: TrainConfig, device: torch.device) -> Classifier:
    """``model`` with the config's throughput options, in place: ``channels_last`` (NHWC weights, for the
    convolutional families on CUDA, see :func:`uses_channels_last`) and ``compile`` (``torch.compile`` of the
    body, through ``nn.Module.compile`` so that its state_dict and checkpoints keep their keys)."""
    if uses_channels_last(config, device):
        model.to(memory_format=torch.channels_last)
    if config.compile:
        model.body.compile()
    return model
