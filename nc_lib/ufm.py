"""The unconstrained features model (UFM) of Zhu et al. (2021): the model, its objective and its trainer.

The network body is replaced by free feature vectors. With C classes, n_c features per class
(N = sum_c n_c, balanced n_c = n by default), features H (N x d, one row h_i per sample), a
classifier head (a :class:`nc_lib.heads.Head`; for the default :class:`~nc_lib.heads.LinearHead`
logits = W h + b with W (C x d), b (C,)), the objective is (REFERENCE.md section 3)

    f(W, H, b) = (1/N) sum_i loss(W h_i + b, y_i) + lambda_W/2 ||W||_F^2
                 + lambda_H/2 ||H||_F^2 + lambda_b/2 ||b||^2,

with loss the cross-entropy ``"ce"`` or the squared error ``"mse"``,
loss(z, y) = 1/2 ||z - e_y||^2 (Zhou et al. 2022's regularised MSE UFM).

What is here
------------
* :class:`UFMConfig` and :func:`train_ufm`: seeded initialisation, optimisers ``"gd"`` (full
  batch), ``"sgd"`` (minibatch), ``"adam"``, ``"lbfgs"``; every ``measure_every`` steps a record
  with loss, objective, accuracy, norms and every measurement of
  :func:`nc_lib.metrics.measure_collapse`, and a snapshot (class means, classifier rows, a
  fixed subsample of features) for :func:`nc_lib.plots.collapse_animation`. A run stops and
  resumes from its :class:`UFMHistory` with identical results.
* :func:`ufm_objective`: the objective f above as a function of (W, H, b).
* The theory (Theorem 3.1's global minimum, the saddle at the origin, Hessian-vector products,
  Lanczos) is in :mod:`nc_lib.ufm_theory`.

Which head parameters are decayed: every head parameter whose name ends in ``"bias"`` gets
lambda_b, every other head parameter lambda_W (for LinearHead: W and b exactly as above). The
trainer only calls ``head(h)`` (``head(h, labels)`` for a head with ``needs_labels`` while training),
``head.named_parameters()``, ``head.renormalise_()`` after each step for a head with
``renormalise_after_step``, and, to measure, ``head.classifier()``.
"""
from __future__ import annotations

import copy
import functools
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deprecation import moved_names
from .heads import FixedETFHead, Head, LinearHead
from .validation import check_choice, check_int, check_nonnegative, check_positive

LOSSES = ("ce", "mse")
OPTIMIZERS = ("gd", "sgd", "adam", "lbfgs")
HEADS = ("linear", "fixed_etf")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Default learning rate per (optimiser, loss), tuned on UFM-10 with lambdas 5e-4 (CE + GD reaches
#: the theorem's objective to ~1e-7 relative in 2,000 steps). MSE has bias curvature 1, so GD needs lr < 2.
DEFAULT_LR = {("gd", "ce"): 10.0, ("gd", "mse"): 1.0, ("sgd", "ce"): 5.0, ("sgd", "mse"): 0.5,
              ("adam", "ce"): 1e-2, ("adam", "mse"): 1e-2, ("lbfgs", "ce"): 1.0, ("lbfgs", "mse"): 1.0}

#: Keys of a training record besides the measurements of nc_lib.metrics.
RECORD_KEYS = ("step", "loss", "objective", "accuracy", "norm_W", "norm_H", "norm_b", "time")


# --------------------------------------------------------------------------- configuration
@dataclass
class UFMConfig:
    """Everything that defines a UFM run (all validated by :meth:`validate`).

    num_classes C; n_per_class an int (balanced) or a list of C counts (unbalanced); feature_dim d;
    loss "ce"|"mse"; optimizer "gd"|"sgd"|"adam"|"lbfgs"; lr (None: :data:`DEFAULT_LR`);
    momentum (gd/sgd); batch_size (sgd: default 128; adam: None = full batch); lambda_W,
    lambda_H, lambda_b the weight decays; bias: learn b; head "linear"|"fixed_etf" or a callable
    ``(feature_dim, num_classes) -> Head`` (later heads drop in unchanged); head_kwargs passed on;
    init_scale: H and (LinearHead) W entries ~ N(0, init_scale^2), b = 0; seed; dtype
    "float32"|"float64"; snapshot_classes / snapshot_features_per_class: how much of each
    snapshot to keep (the first classes, a fixed random subsample of their features).
    lr_H: a learning rate of its own for the features H (None: lr; gd, sgd and adam), e.g. N x lr to
    give each h_i the step of its own sample's loss, as Markou's UFM experiments do;
    measurement_tau: measure the features as tau h/||h|| (Markou's convention for normalised heads)
    instead of raw (None).
    """

    num_classes: int = 10
    n_per_class: int | Sequence[int] = 100
    feature_dim: int = 512
    loss: str = "ce"
    optimizer: str = "gd"
    lr: float | None = None
    momentum: float = 0.0
    batch_size: int | None = None
    lambda_W: float = 5e-4
    lambda_H: float = 5e-4
    lambda_b: float = 5e-4
    bias: bool = True
    head: str | Callable[[int, int], Head] = "linear"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    init_scale: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    snapshot_classes: int = 20
    snapshot_features_per_class: int = 10
    lr_H: float | None = None
    measurement_tau: float | None = None

    def validate(self) -> "UFMConfig":
        """Check every field; raise a ValueError naming the parameter and the valid choices."""
        C = check_int("num_classes", self.num_classes, 2)
        check_int("feature_dim", self.feature_dim, 1)
        self.counts()
        check_choice("loss", self.loss, LOSSES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None:
            check_positive("lr", self.lr)
        check_nonnegative("momentum", self.momentum)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.momentum and self.optimizer not in ("gd", "sgd"):
            raise ValueError(f"momentum applies to optimizer 'gd' or 'sgd', not {self.optimizer!r}; set momentum=0.")
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, 1)
            if self.optimizer in ("gd", "lbfgs"):
                raise ValueError(f"batch_size applies to optimizer 'sgd' or 'adam'; optimizer={self.optimizer!r} "
                                 "is full batch: set batch_size=None.")
        for name in ("lambda_W", "lambda_H", "lambda_b", "init_scale"):
            check_nonnegative(name, getattr(self, name))
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be True or False, got {self.bias!r}.")
        if not callable(self.head):
            check_choice("head", self.head, HEADS)
            if self.head == "fixed_etf" and self.feature_dim < C:
                raise ValueError(f"head='fixed_etf' needs feature_dim >= num_classes; got feature_dim="
                                 f"{self.feature_dim}, num_classes={C}. Use head='linear' for d < C.")
        check_int("seed", self.seed, 0)
        check_choice("dtype", self.dtype, list(DTYPES))
        check_int("snapshot_classes", self.snapshot_classes, 1)
        check_int("snapshot_features_per_class", self.snapshot_features_per_class, 0)
        if self.lr_H is not None:
            check_positive("lr_H", self.lr_H)
            if self.optimizer == "lbfgs":
                raise ValueError("lr_H applies to optimizer 'gd', 'sgd' or 'adam' (L-BFGS takes one step size "
                                 "for all parameters); set lr_H=None.")
        if self.measurement_tau is not None:
            check_positive("measurement_tau", self.measurement_tau)
        return self

    def counts(self) -> list[int]:
        """Samples per class (C ints)."""
        C = check_int("num_classes", self.num_classes, 2)
        if isinstance(self.n_per_class, (list, tuple)):
            if len(self.n_per_class) != C:
                raise ValueError(f"n_per_class must be one int or a list of num_classes={C} ints; "
                                 f"got a list of {len(self.n_per_class)}.")
            return [check_int(f"n_per_class[{c}]", v, 1) for c, v in enumerate(self.n_per_class)]
        return [check_int("n_per_class", self.n_per_class, 1)] * C

    @property
    def balanced(self) -> bool:
        return len(set(self.counts())) == 1

    @property
    def num_samples(self) -> int:
        return sum(self.counts())

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[(self.optimizer, self.loss)] if self.lr is None else float(self.lr)

    @property
    def effective_batch_size(self) -> int | None:
        if self.optimizer == "sgd":
            return min(self.batch_size or 128, self.num_samples)
        if self.optimizer == "adam" and self.batch_size is not None:
            return min(self.batch_size, self.num_samples)
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("lr_H", "measurement_tau"):  # later fields: left out at their default, so that the
            if d[name] is None:                  # dicts (and the run hashes made of them) of earlier runs hold
                del d[name]
        if callable(self.head):
            d["head"] = getattr(self.head, "__name__", repr(self.head))
        if isinstance(d["n_per_class"], tuple):
            d["n_per_class"] = list(d["n_per_class"])
        return d


def as_config(config: UFMConfig | dict[str, Any] | None = None, **overrides: Any) -> UFMConfig:
    """A validated :class:`UFMConfig` from a config, a dict of its fields, or keywords."""
    if config is None:
        config = UFMConfig()
    elif isinstance(config, dict):
        fields = {f.name for f in dataclasses.fields(UFMConfig)}
        bad = sorted(set(config) - fields)
        if bad:
            raise ValueError(f"unknown UFM config field(s) {bad}; valid fields are {sorted(fields)}.")
        config = UFMConfig(**config)
    elif not isinstance(config, UFMConfig):
        raise ValueError(f"config must be a UFMConfig, a dict or None; got {type(config).__name__}.")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return config.validate()


def ufm_labels(counts: Sequence[int]) -> Tensor:
    """Labels in class-major order: n_0 zeros, then n_1 ones, ... (long tensor)."""
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(list(counts)))


# --------------------------------------------------------------------------- the model
def _make_head(config: UFMConfig) -> Head:
    d, C = config.feature_dim, config.num_classes
    if callable(config.head):
        head = config.head(d, C, **config.head_kwargs)
        if not isinstance(head, nn.Module):
            raise ValueError(f"head callable must return a torch.nn.Module (a nc_lib.heads.Head); got {type(head).__name__}.")
        return head
    if config.head == "linear":
        return LinearHead(d, C, bias=config.bias, **config.head_kwargs)
    kwargs = {"bias": "learned" if config.bias else "none", **config.head_kwargs}
    return FixedETFHead(d, C, **kwargs)


class UFM(nn.Module):
    """Free features ``H`` (N x d parameter) and a classifier head; ``labels`` a buffer."""

    def __init__(self, config: UFMConfig, H: Tensor | None = None, W: Tensor | None = None,
                 b: Tensor | None = None) -> None:
        super().__init__()
        self.config = config = as_config(config)
        dtype = DTYPES[config.dtype]
        g = torch.Generator().manual_seed(config.seed)
        N, d = config.num_samples, config.feature_dim
        self.register_buffer("labels", ufm_labels(config.counts()))
        h0 = config.init_scale * torch.randn(N, d, generator=g, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.head = _make_head(config).to(dtype)
        if isinstance(self.head, LinearHead):
            with torch.no_grad():
                self.head.linear.weight.copy_(config.init_scale * torch.randn(
                    config.num_classes, d, generator=g, dtype=torch.float64))
                if self.head.linear.bias is not None:
                    self.head.linear.bias.zero_()
        self.H = nn.Parameter(h0.to(dtype))
        with torch.no_grad():
            if H is not None:
                self.H.copy_(torch.as_tensor(H))
            if W is not None or b is not None:
                if not isinstance(self.head, LinearHead):
                    raise ValueError("W and b can only be set for head='linear'.")
                if W is not None:
                    self.head.linear.weight.copy_(torch.as_tensor(W))
                if b is not None:
                    if self.head.linear.bias is None:
                        raise ValueError("b was given but the config has bias=False.")
                    self.head.linear.bias.copy_(torch.as_tensor(b))

    def forward(self, index: Tensor | None = None) -> Tensor:
        """Logits of all samples (or of the rows ``index``). A head that reads the labels while
        training (``needs_labels``, e.g. Markou's implicit ETF head) gets them."""
        h = self.H if index is None else self.H[index]
        if getattr(self.head, "needs_labels", False) and self.head.training:
            return self.head(h, self.labels if index is None else self.labels[index])
        return self.head(h)

    def after_step(self) -> None:
        """What a head asks for after each optimiser step (a cosine head renormalises its rows)."""
        if getattr(self.head, "renormalise_after_step", False):
            with torch.no_grad():
                self.head.renormalise_()

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        return self.head.classifier()

    def param_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """(name, parameters, weight decay): H -> lambda_H, head biases -> lambda_b, other head params -> lambda_W."""
        cfg = self.config
        weights = [p for n, p in self.head.named_parameters() if p.requires_grad and not n.endswith("bias")]
        biases = [p for n, p in self.head.named_parameters() if p.requires_grad and n.endswith("bias")]
        groups = [("H", [self.H], cfg.lambda_H), ("W", weights, cfg.lambda_W), ("b", biases, cfg.lambda_b)]
        return [g for g in groups if g[1]]

    def regulariser(self) -> Tensor:
        """lambda_W/2 ||W||^2 + lambda_H/2 ||H||^2 + lambda_b/2 ||b||^2 (head parameters as in :meth:`param_groups`)."""
        total = self.H.new_zeros(())
        for _, params, lam in self.param_groups():
            if lam:
                total = total + lam / 2 * sum(torch.linalg.vector_norm(p) ** 2 for p in params)
        return total


def data_loss(logits: Tensor, labels: Tensor, loss: str) -> Tensor:
    """Mean over samples of CE(z_i, y_i), or of 1/2 ||z_i - e_{y_i}||^2 for ``"mse"``."""
    check_choice("loss", loss, LOSSES)
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return 0.5 * (logits - target).pow(2).sum(1).mean()


def ufm_objective(W: Tensor, H: Tensor, b: Tensor | None, labels: Tensor, *, loss: str = "ce",
                  lambda_W: float = 5e-4, lambda_H: float = 5e-4, lambda_b: float = 5e-4) -> Tensor:
    """f(W, H, b) = (1/N) sum_i loss(W h_i + b, y_i) + lambda_W/2||W||^2 + lambda_H/2||H||^2 + lambda_b/2||b||^2."""
    logits = H @ W.T if b is None else H @ W.T + b
    f = data_loss(logits, labels, loss) + lambda_W / 2 * W.pow(2).sum() + lambda_H / 2 * H.pow(2).sum()
    if b is not None:
        f = f + lambda_b / 2 * b.pow(2).sum()
    return f


# --------------------------------------------------------------------------- training
def _make_optimizer(model: UFM) -> torch.optim.Optimizer:
    cfg = model.config
    lr = cfg.learning_rate
    groups = model.param_groups()
    if cfg.optimizer == "lbfgs":  # one parameter group only: the closure adds the regulariser itself
        params = [p for _, ps, _ in groups for p in ps]
        return torch.optim.LBFGS(params, lr=lr, history_size=10, max_iter=1, line_search_fn="strong_wolfe",
                                 tolerance_grad=1e-15, tolerance_change=1e-20)
    # weight decay in the optimiser adds lambda p to the gradient: exactly the gradient of lambda/2 ||p||^2
    pg = [{"params": ps, "weight_decay": lam, "lr": cfg.lr_H if name == "H" and cfg.lr_H is not None else lr}
          for name, ps, lam in groups]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(pg, lr=lr)
    return torch.optim.SGD(pg, lr=lr, momentum=cfg.momentum)


@functools.lru_cache(maxsize=None)
def _collapse_keys(num_classes: int, dim: int, dtype: torch.dtype) -> tuple[str, ...]:
    """The keys that :func:`measure_collapse` returns with a classifier (read off a random problem)."""
    from .metrics import measure_collapse

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat(2)
    H = torch.randn(len(labels), dim, generator=g, dtype=dtype)
    W = torch.randn(num_classes, dim, generator=g, dtype=dtype)
    return tuple(measure_collapse(H, labels, num_classes, W, torch.zeros(num_classes, dtype=dtype)))


class UFMHistory:
    """A UFM run: its model and optimiser state, its records and snapshots; pass it back to
    :func:`train_ufm` to resume exactly where it stopped.

    ``records``: one dict per measurement (keys :data:`RECORD_KEYS` plus every key of
    :func:`nc_lib.metrics.measure_collapse`); ``snapshots``: one dict per measurement with
    ``step``, ``means`` (first ``snapshot_classes`` class means, rows), ``W`` (their classifier
    rows), ``global_mean`` (mean of all class means), ``features`` and ``feature_labels`` (a fixed
    subsample), all float64 CPU tensors; ``step``: optimiser steps taken so far.
    """

    def __init__(self, config: UFMConfig | dict[str, Any] | None = None, *, H: Tensor | None = None,
                 W: Tensor | None = None, b: Tensor | None = None, fast_path: bool = True,
                 device: str | torch.device | None = None) -> None:
        self.config = as_config(config)
        self.model = UFM(self.config, H=H, W=W, b=b)  # initialised on the CPU: the same numbers on any device
        self.device = _resolve_device(device)
        self.model.to(self.device)
        self.optimizer = _make_optimizer(self.model)
        self.step = 0
        self.records: list[dict[str, float]] = []
        self.snapshots: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.rng = torch.Generator().manual_seed(self.config.seed + 1)  # minibatch order
        self.perm: Tensor | None = None
        self.perm_pos = 0
        self.stopped_early = False
        self.fast_path = fast_path
        self._rows: Tensor | None = None
        self._averaging: Tensor | None = None
        self.live_figure: Any = None
        self._snapshot_index = self._choose_snapshot_rows()

    # ---- helpers
    def _choose_snapshot_rows(self) -> Tensor:
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed + 2)
        labels = self.model.labels
        rows = []
        for c in range(min(cfg.num_classes, cfg.snapshot_classes)):
            idx = (labels == c).nonzero().flatten()
            k = min(cfg.snapshot_features_per_class, idx.numel())
            rows.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)

    @property
    def labels(self) -> Tensor:
        return self.model.labels

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one record key."""
        if self.records and key not in self.records[-1]:
            raise ValueError(f"key={key!r} is not recorded; choose one of {sorted(self.records[-1])}.")
        return [r["step"] for r in self.records], [r[key] for r in self.records]

    @property
    def last(self) -> dict[str, float]:
        if not self.records:
            raise ValueError("this history has no records yet; train it first.")
        return self.records[-1]

    def parameters(self) -> dict[str, Tensor]:
        """Current H, W, b (detached; W, b from ``head.classifier()``)."""
        W, b = self.model.classifier()
        return {"H": self.model.H.detach(), "W": W.detach(), "b": None if b is None else b.detach()}

    # ---- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "step": self.step, "records": self.records,
            "snapshots": self.snapshots, "elapsed": self.elapsed, "rng": self.rng.get_state(),
            "perm": self.perm, "perm_pos": self.perm_pos, "fast_path": self.fast_path,
        }

    def save(self, path: str | Path) -> Path:
        """Save everything needed to resume (needs a named head, not a callable)."""
        if callable(self.config.head):
            raise ValueError("a run with a callable head cannot be saved by name; use head='linear' or 'fixed_etf'.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "UFMHistory":
        """A saved run, on ``device`` (None: the CPU)."""
        state = torch.load(Path(path), weights_only=False, map_location="cpu")
        hist = cls(state["config"], fast_path=state.get("fast_path", True), device=device)
        hist.model.load_state_dict(state["model"])
        hist.optimizer.load_state_dict(state["optimizer"])
        hist.step, hist.records, hist.snapshots = state["step"], state["records"], state["snapshots"]
        hist.elapsed, hist.perm, hist.perm_pos = state["elapsed"], state["perm"], state["perm_pos"]
        hist.rng.set_state(state["rng"])
        return hist

    def copy(self) -> "UFMHistory":
        """An independent deep copy (to branch a run)."""
        live, self.live_figure = self.live_figure, None
        try:
            return copy.deepcopy(self)
        finally:
            self.live_figure = live

    # ---- one step
    def _next_batch(self, B: int) -> Tensor:
        N = self.config.num_samples
        if self.perm is None or self.perm_pos + B > N:
            self.perm = torch.randperm(N, generator=self.rng)
            self.perm_pos = 0
        idx = self.perm[self.perm_pos:self.perm_pos + B]
        self.perm_pos += B
        return idx.to(self.device)

    @property
    def uses_fast_path(self) -> bool:
        """Full-batch GD without momentum on a LinearHead takes a fused, hand-derived step (no autograd)."""
        cfg = self.config
        return (self.fast_path and cfg.optimizer == "gd" and cfg.momentum == 0
                and type(self.model.head) is LinearHead)

    @torch.no_grad()
    def _fast_gd_step(self) -> None:
        """One GD step with the gradients written out (same update as torch.optim.SGD with weight decay):

            G = (softmax(Z) - Y)/N  (CE)  or  (Z - Y)/N  (MSE),   Z = H W^T + b,
            W <- W - lr (G^T H + lambda_W W),  b <- b - lr (1^T G + lambda_b b),
            H <- (1 - lr lambda_H) H - lr G W   (one fused addmm_, the old W).
        """
        cfg, model = self.config, self.model
        lr = cfg.learning_rate
        H, W, b = model.H, model.head.linear.weight, model.head.linear.bias
        N = H.shape[0]
        Z = torch.addmm(b, H, W.T) if b is not None else H @ W.T
        G = torch.softmax(Z, dim=1) if cfg.loss == "ce" else Z
        if self._rows is None:
            self._rows = torch.arange(N, device=H.device)
        G[self._rows, model.labels] -= 1.0
        G /= N
        gW = G.T @ H
        H.addmm_(G, W, beta=1.0 - lr * cfg.lambda_H, alpha=-lr)
        gW.add_(W, alpha=cfg.lambda_W)
        W.add_(gW, alpha=-lr)
        if b is not None:
            gb = G.sum(0).add_(b, alpha=cfg.lambda_b)
            b.add_(gb, alpha=-lr)

    def _step(self) -> None:
        model, opt, cfg = self.model, self.optimizer, self.config
        labels = model.labels
        if self.uses_fast_path:
            self._fast_gd_step()
            return
        if cfg.optimizer == "lbfgs":
            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                f = data_loss(model(), labels, cfg.loss) + model.regulariser()
                f.backward()
                return f
            opt.step(closure)
            model.after_step()
            state = opt.state[opt.param_groups[0]["params"][0]]
            if state.get("t", 1.0) == 0:
                # the strong-Wolfe search found no step along a poor quasi-Newton direction; torch's
                # LBFGS would then repeat that direction forever: restart from steepest descent
                state.clear()
            return
        opt.zero_grad(set_to_none=True)
        B = cfg.effective_batch_size
        if B is None:
            loss = data_loss(model(), labels, cfg.loss)
        else:
            idx = self._next_batch(B)
            loss = data_loss(model(idx), labels[idx], cfg.loss)
        loss.backward()
        opt.step()
        model.after_step()

    # ---- measurement
    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """Record loss, objective, accuracy, norms and every collapse measurement at the current step,
        and a snapshot. Returns the record."""
        from .metrics import NoBetweenClassSpreadError, measure_collapse

        model, cfg = self.model, self.config
        was_training = model.training
        model.eval()
        try:
            logits = model()
            loss = float(data_loss(logits, model.labels, cfg.loss))
            W, b = model.classifier()
            H = model.H.detach()
            rec: dict[str, float] = {"step": self.step, "loss": loss, "objective": loss + float(model.regulariser())}
            if not math.isfinite(rec["objective"]):
                raise FloatingPointError(self._divergence_message(rec["objective"]))
            feats = H if cfg.measurement_tau is None else cfg.measurement_tau * F.normalize(H, dim=1)
            try:
                rec.update(measure_collapse(feats, model.labels, cfg.num_classes, W, b))
            except NoBetweenClassSpreadError:
                # a point without between-class spread (the origin saddle: H = 0): every collapse
                # measurement is undefined there, so the record says NaN rather than a number
                rec.update(dict.fromkeys(_collapse_keys(cfg.num_classes, W.shape[1], W.dtype), math.nan))
            rec["accuracy"] = float((logits.argmax(1) == model.labels).double().mean())
            rec["norm_W"] = float(torch.linalg.vector_norm(W))
            rec["norm_H"] = float(torch.linalg.vector_norm(H))
            rec["norm_b"] = 0.0 if b is None else float(b.norm())
            rec["time"] = self.elapsed
        finally:
            model.train(was_training)
        self.records.append(rec)
        self._snapshot(H, W)
        return rec

    def _divergence_message(self, objective: float) -> str:
        """Why the objective is not finite and what to change: a regularisation weight whose term overflows
        (or whose decay step lr * lambda alone overshoots, |1 - lr lambda| > 1 for gradient descent) is named;
        otherwise the learning rate."""
        cfg, model = self.config, self.model
        names = {"H": "lambda_H", "W": "lambda_W", "b": "lambda_b"}
        groups = model.param_groups()
        for g, params, lam in groups:
            if lam and cfg.optimizer in ("gd", "sgd") and cfg.learning_rate * lam > 2:
                return (f"the UFM diverged: the objective is {objective} at step {self.step}; lr * {names[g]} = "
                        f"{cfg.learning_rate * lam:.3g} > 2, so the weight-decay step alone overshoots: lower "
                        f"{names[g]} (now {lam:g}) or lr (now {cfg.learning_rate}).")
        for g, params, lam in groups:
            term = lam / 2 * sum(float(torch.linalg.vector_norm(p.detach().double()) ** 2) for p in params)
            if lam and (math.isinf(term) or term > torch.finfo(model.H.dtype).max / 4):
                return (f"the UFM objective is {objective} at step {self.step}: the regularisation {names[g]}/2 ||{g}||^2 "
                        f"= {term:.3g} overflows {model.H.dtype}; lower {names[g]} (now {lam:g}).")
        return (f"the UFM diverged: the objective is {objective} at step {self.step}; lower lr "
                f"(now {cfg.learning_rate} for optimizer={cfg.optimizer!r}, loss={cfg.loss!r}).")

    def _snapshot(self, H: Tensor, W: Tensor) -> None:
        cfg = self.config
        S = min(cfg.num_classes, cfg.snapshot_classes)
        labels = self.model.labels
        if self._averaging is None or self._averaging.dtype != H.dtype:
            onehot = torch.zeros(cfg.num_classes, labels.numel(), dtype=H.dtype, device=H.device)
            onehot[labels, torch.arange(labels.numel(), device=H.device)] = 1.0
            self._averaging = onehot / onehot.sum(1, keepdim=True)
        means = (self._averaging @ H).to(torch.float64)  # one pass over H: class means
        idx = self._snapshot_index.to(H.device)
        cpu64 = dict(device="cpu", dtype=torch.float64)
        self.snapshots.append({
            "step": self.step, "means": means[:S].to(**cpu64), "W": W[:S].to(**cpu64),
            "global_mean": means.mean(0).to(**cpu64), "features": H[idx].to(**cpu64),
            "feature_labels": labels[idx].cpu(), "num_classes": cfg.num_classes,
        })


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> the CPU; otherwise as the training engine ("auto", "cpu", "cuda", "mps")."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    from .config import resolve_device

    return resolve_device(device)


def start_ufm(config: UFMConfig | dict[str, Any] | None = None, *, H: Tensor | None = None,
              W: Tensor | None = None, b: Tensor | None = None, fast_path: bool = True,
              device: str | torch.device | None = None) -> UFMHistory:
    """A fresh run at its seeded initialisation, or at a given point (H, W, b) (head='linear' for W, b).

    ``fast_path=False`` makes full-batch GD use torch.optim.SGD and autograd like every other
    optimiser (same update, different rounding). ``device``: where to train (None: CPU; "auto":
    CUDA if present); the initialisation is drawn on the CPU, so a seed gives the same start anywhere."""
    return UFMHistory(config, H=H, W=W, b=b, fast_path=fast_path, device=device)


LIVE_KEYS = ("objective", "within_class_variability", "classifier_etf_distance", "classifier_means_alignment")


def train_ufm(config: UFMConfig | dict[str, Any] | None = None, steps: int = 2000, measure_every: int = 20,
              history: UFMHistory | None = None, *, progress: bool = True, live: Any = False,
              live_keys: Sequence[str] = LIVE_KEYS, stop_when: Callable[[UFMHistory], bool] | None = None,
              callback: Callable[[UFMHistory, dict[str, float]], None] | None = None,
              num_threads: int | None = None, device: str | torch.device | None = None) -> UFMHistory:
    """Train the UFM for ``steps`` more optimiser steps, measuring every ``measure_every`` steps.

    ``history=None`` starts a run from ``config``; pass a :class:`UFMHistory` to resume it (then
    ``config`` may be None, and if given must equal the run's). Measurements (and snapshots) are
    taken at every step that is a multiple of ``measure_every`` (step 0 included), and at the
    last step of the call, so a run trained in pieces records the same as one trained at once
    when the pieces end on multiples of ``measure_every``; its parameters are identical in any
    case. ``progress`` shows a tqdm.auto bar; ``live=True`` displays a live figure of ``live_keys``
    updated at each measurement (a FigureWidget where widgets render, else a plain figure redrawn in
    place, :mod:`nc_lib.frontend`; it ends as a plain figure) (or pass your own from
    :func:`nc_lib.plots.live_metrics_figure`); ``stop_when(history)`` is asked after each
    measurement and stops the run when it returns True (``history.stopped_early``);
    ``callback(history, record)`` is called after each measurement.

    ``device``: where a new run trains (None: CPU; "auto": CUDA if present; a resumed history stays on its
    own device). ``num_threads``: torch threads during the call (restored after). None picks 1 for small
    problems (N d <= 2^22, e.g. UFM-10), where the matrix products are too thin to share and a
    second thread only waits on a busy core, and leaves torch's setting alone otherwise.

    Interrupting the kernel (SIGINT, in the main thread) stops the run *between* optimiser steps: the
    interrupt is noted and takes effect after the step (or measurement) under way, so every step is
    applied whole and a resumed run equals an uninterrupted one. A second interrupt before then stops
    at once (for a step that hangs), which may leave that step partly applied.
    """
    steps = check_int("steps", steps, 0)
    measure_every = check_int("measure_every", measure_every, 1)
    if history is None:
        history = start_ufm(config, device=device)
    elif not isinstance(history, UFMHistory):
        raise ValueError(f"history must be a UFMHistory from train_ufm or None; got {type(history).__name__}.")
    elif config is not None and as_config(config).to_dict() != history.config.to_dict():
        raise ValueError("config differs from the config of the history being resumed; pass config=None to resume.")
    fig = None
    if live is True:  # a FigureWidget where widgets render, else a plain figure redrawn in place (nc_lib.frontend)
        from .plots import live_metrics_figure, show_live
        fig = show_live(live_metrics_figure(live_keys))
    elif live:
        fig = live
    if fig is not None:
        history.live_figure = fig
    recorded = {r["step"] for r in history.records}

    def measure() -> None:
        rec = history.measure()
        recorded.add(history.step)
        if fig is not None:
            from .plots import update_live_figure
            update_live_figure(fig, history.records, live_keys)
        if callback is not None:
            callback(history, rec)

    from tqdm.auto import tqdm
    cfg = history.config
    if num_threads is None:
        num_threads = 1 if cfg.num_samples * cfg.feature_dim <= 2 ** 22 else torch.get_num_threads()
    num_threads = check_int("num_threads", num_threads, 1)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    bar = tqdm(total=steps, disable=not progress, desc=f"UFM C={history.config.num_classes} {history.config.optimizer}",
               leave=False)
    history.stopped_early = False
    target = history.step + steps
    t0 = time.perf_counter()
    interrupt = _DeferredInterrupt()
    try:
        interrupt.__enter__()
        if history.step % measure_every == 0 and history.step not in recorded and _classifier_ready(history.model.head):
            measure()
        while history.step < target:
            if interrupt.requested:
                raise KeyboardInterrupt
            history._step()
            history.step += 1
            bar.update(1)
            if history.step % measure_every == 0 or history.step == target or not history.records:
                history.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                measure()
                last = history.records[-1]
                bar.set_postfix(obj=f"{last['objective']:.4g}", acc=f"{last['accuracy']:.3f}",
                                nc1=f"{last.get('within_class_variability', float('nan')):.2e}", refresh=False)
                if stop_when is not None and stop_when(history):
                    history.stopped_early = True
                    break
    except KeyboardInterrupt:
        history.stopped_early = True
    finally:
        interrupt.__exit__()
        history.elapsed += time.perf_counter() - t0
        bar.close()
        torch.set_num_threads(saved_threads)
        if fig is not None:  # the last state as a plain figure, which renders anywhere
            from .frontend import finish_live
            finish_live(fig)
    return history


class _DeferredInterrupt:
    """Holds back SIGINT (a Jupyter interrupt) while :func:`train_ufm` steps: the handler only sets
    ``requested``, which the loop reads between optimiser steps; a second SIGINT before then raises
    KeyboardInterrupt at once. Outside the main thread (where handlers cannot be set), or when SIGINT is
    ignored, nothing is changed."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> "_DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGINT)
            if old is not signal.SIG_IGN and old is not None:
                signal.signal(signal.SIGINT, self._handler)
                self._old = old
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _classifier_ready(head: nn.Module) -> bool:
    """False for a head whose classifier exists only after its first training step (Markou's implicit ETF
    head): the run then takes its first measurement after step 1."""
    ready = getattr(head, "initialised", True)
    return bool(ready)


# --------------------------------------------------------------------------- moved names (one release)
#: the theory that lived here until 0.1 (now nc_lib.ufm_theory): still importable here, with a DeprecationWarning
__getattr__ = moved_names(__name__, {name: "nc_lib.ufm_theory" for name in (
    "UFMGlobalMinimum", "theorem_objective_1d", "theorem_rho_closed_form", "ufm_global_minimum",
    "ufm_optimal_objective", "UFMObjective", "lanczos_smallest", "power_iteration_smallest", "OriginSaddle",
    "origin_saddle", "planar_angles")})
