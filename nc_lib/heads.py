"""Classifier heads: every last layer of the kit, one interface, pluggable into the UFM and every network.

A head maps penultimate features ``h`` (B x d) to logits (B x C). Every head exposes its
current classifier through :meth:`Head.classifier` as ``(W, b)`` with ``W`` of shape (C x d)
and ``b`` of shape (C,) or ``None``; that is what the collapse measurements read. Two optional
flags tell the trainers what else a head needs: ``needs_labels`` (call ``head(h, labels)`` in
training) and ``renormalise_after_step`` (call ``head.renormalise_()`` after each optimiser step).

- :class:`LinearHead`: the ordinary learned classifier ``W h + b``.
- :class:`FixedETFHead`: Zhu et al. 2021's fixed classifier, the canonical simplex ETF in the
  first C coordinates, frozen (no gradient, no parameters), with an optional bias.
- :class:`CosineHead`: Markou et al. 2024's "standard" classifier with normalisation (learned rows
  renormalised after every step, on tau-normalised features).
- :class:`ImplicitETFHead`: Markou et al. 2024's implicit ETF classifier, the simplex ETF nearest to
  the running class means, solved at every step by the node of :mod:`nc_lib.nearest_etf`.
- :class:`NormalisedHead`: Markou's feature normalisation ``tau h/||h||`` in front of any head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .etf import simplex_etf
from .nearest_etf import (DEFAULT_DELTA, DEFAULT_TAU, POLAR_METHODS, SOLVERS, FeatureMeanTracker, check_dims,
                          etf_classifier, nearest_etf_node, nearest_etf_solve)
from .validation import check_choice, check_int, check_positive


class Head(nn.Module):
    """Base class: ``forward(h) -> logits`` and ``classifier() -> (W, b)``."""

    num_classes: int
    feature_dim: int

    def classifier(self) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - interface
        raise NotImplementedError


class _LearnedLinear(Head):
    """A learned ``nn.Linear(d, C)`` as ``self.linear``, read as ``(W, b)`` by :meth:`classifier`."""

    def __init__(self, feature_dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.linear = nn.Linear(self.feature_dim, self.num_classes, bias=bias)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        b = self.linear.bias
        return self.linear.weight.detach(), None if b is None else b.detach()


class LinearHead(_LearnedLinear):
    """Learned linear classifier: logits = W h + b, W (C x d)."""

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h)


FIXED_BIAS_CHOICES = ("none", "learned", "centre")


class FixedETFHead(Head):
    """Fixed simplex ETF classifier (Zhu et al. 2021, Sec. 5; Markou et al. 2024's "fixed ETF").

    W = sqrt(C/(C-1)) (I_C - 11^T/C) embedded in the first C coordinates of R^d (needs d >= C),
    stored as a buffer: it is never trained and receives no gradient.

    bias: ``"none"``; ``"learned"`` (a trainable b, Zhu); ``"centre"`` (b = -W mean(batch h), the
    batch features' mean, as Markou et al. do; in eval mode the running mean of training batches).
    """

    def __init__(self, feature_dim: int, num_classes: int, bias: str = "learned", scale: float = 1.0) -> None:
        super().__init__()
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.num_classes = check_int("num_classes", num_classes, 2)
        if self.feature_dim < self.num_classes:
            raise ValueError(
                f"FixedETFHead places the canonical ETF in the first C coordinates, so it needs "
                f"feature_dim >= num_classes; got feature_dim={feature_dim}, num_classes={num_classes}."
            )
        self.bias_mode = check_choice("bias", bias, FIXED_BIAS_CHOICES)
        W = torch.zeros(self.num_classes, self.feature_dim)
        W[:, : self.num_classes] = scale * simplex_etf(self.num_classes, self.num_classes, dtype=torch.float64).float()
        self.register_buffer("weight", W)
        if self.bias_mode == "learned":
            self.bias = nn.Parameter(torch.zeros(self.num_classes))
        else:
            self.bias = None
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("mean_count", torch.zeros((), dtype=torch.long))

    def _centre_bias(self, h: Tensor) -> Tensor:
        if self.training:
            m = h.detach().mean(0)
            with torch.no_grad():
                self.mean_count += 1
                self.feature_mean += (m - self.feature_mean) / self.mean_count.clamp(min=1)
        else:
            m = self.feature_mean
        return -(self.weight @ m)

    def forward(self, h: Tensor) -> Tensor:
        logits = h @ self.weight.T
        if self.bias_mode == "learned":
            logits = logits + self.bias
        elif self.bias_mode == "centre":
            logits = logits + self._centre_bias(h)
        return logits

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        if self.bias_mode == "learned":
            return self.weight, self.bias.detach()
        if self.bias_mode == "centre":
            return self.weight, -(self.weight @ self.feature_mean)
        return self.weight, None


class CosineHead(_LearnedLinear):
    """Markou's "standard" classifier with normalisation: a learned linear layer on tau-normalised
    features whose rows are renormalised to unit norm after every optimiser step.

        logits = W (tau h/||h||) + b,    after each step  w_c <- w_c/||w_c||.

    The renormalisation is **not** done in forward (that would be weight normalisation, a
    different gradient): the trainer calls :meth:`renormalise_` after ``optimizer.step()``, as the
    authors' ``model.normalise_classifier()``; ``renormalise_after_step`` is True to say so.
    """

    renormalise_after_step = True

    def __init__(self, feature_dim: int, num_classes: int, tau: float = DEFAULT_TAU, bias: bool = True) -> None:
        super().__init__(feature_dim, num_classes, bias=bias)
        self.tau = check_positive("tau", tau)
        self.renormalise_()

    @torch.no_grad()
    def renormalise_(self) -> None:
        """w_c <- w_c/||w_c|| for every row (call after each optimiser step)."""
        self.linear.weight.copy_(F.normalize(self.linear.weight, dim=1))

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.tau * F.normalize(h, dim=1))


class ImplicitETFHead(Head):
    """Markou's implicit ETF classifier: the classifier is the simplex ETF nearest to the feature means.

    Training mode, per batch (REFERENCE Sec. 4):
        f = tau h/||h||, mu_G = mean(f);  Hbar from :class:`~nc_lib.nearest_etf.FeatureMeanTracker` (labels);
        U* = nearest_etf_node(Hbar, U_prox, delta)   (first batch: U_prox = polar(Hbar Mt), the
             paper's first solve without proximal term -- U* then equals it);
        W = (U* sqrt(C/(C-1)) (I - 11^T/C))^T,  b = -W mu_G,  logits = W f + b;
        U_prox <- U*.
    W and b are not parameters (the optimiser never sees them); gradients reach the features via
    f, mu_G and, with ``backprop_through_node=True``, via Hbar through the node (False: the paper's
    ablation, U* detached). Eval mode uses the W, b of the last training batch. W, b, U_prox and the
    tracker are buffers (saved and restored by ``state_dict``).

    Call it as ``head(h, labels)`` in training mode (``needs_labels`` is True); ``head(h)`` in eval.
    ``solver``: ``"closed"`` (polar factor) or ``"riemannian"`` (trust region, warm start U_prox,
    at most ``max_iter`` iterations; ``last_iterations`` reports the count). Needs d >= C.
    """

    needs_labels = True

    def __init__(self, feature_dim: int, num_classes: int, tau: float = DEFAULT_TAU, delta: float = DEFAULT_DELTA,
                 solver: str = "closed", backprop_through_node: bool = True, max_iter: int = 30,
                 polar_method: str = "auto") -> None:
        super().__init__()
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.num_classes = check_int("num_classes", num_classes, 2)
        check_dims(self.feature_dim, self.num_classes, "ImplicitETFHead")
        self.tau = check_positive("tau", tau)
        self.delta = check_positive("delta", delta)
        self.solver = check_choice("solver", solver, SOLVERS)
        self.polar_method = check_choice("polar_method", polar_method, POLAR_METHODS)
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.backprop_through_node = bool(backprop_through_node)
        self.tracker = FeatureMeanTracker(self.feature_dim, self.num_classes, tau=self.tau)
        d, C = self.feature_dim, self.num_classes
        self.register_buffer("U_prox", torch.zeros(d, C))
        self.register_buffer("weight", torch.zeros(C, d))
        self.register_buffer("bias", torch.zeros(C))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.last_iterations = 0

    def _first_solve(self, Hbar: Tensor) -> Tensor:
        """The first solve, without proximal term (REFERENCE Sec. 4; the authors start pymanopt at eye(d, C))."""
        d, C = Hbar.shape
        start = torch.eye(d, C, dtype=Hbar.dtype, device=Hbar.device)
        U0, it = nearest_etf_solve(Hbar.detach(), None, 0.0, solver=self.solver, U_init=start,
                                   max_iter=max(self.max_iter, 100), polar_method=self.polar_method)
        return U0

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        f = self.tracker.normalise(h)
        if not self.training:
            return f @ self.weight.to(f.dtype).mT + self.bias.to(f.dtype)
        if labels is None:
            raise ValueError("ImplicitETFHead needs the labels in training mode: call head(h, labels) "
                             "(its feature means are class means); in eval mode call head(h).")
        # NaN or Inf in h: a ValueError from the tracker, before its state changes (one scalar check; on a GPU,
        # one host sync)
        Hbar, mu_G = self.tracker.update_normalised(f, labels, name="ImplicitETFHead: the features h")
        if bool(self.initialised):
            U_prox = self.U_prox.to(Hbar.dtype)
        else:
            U_prox = self._first_solve(Hbar)
        kw = dict(solver=self.solver, U_init=U_prox, max_iter=self.max_iter, polar_method=self.polar_method)
        if self.backprop_through_node:
            U, it = nearest_etf_node(Hbar, U_prox, self.delta, **kw)
        else:
            U, it = nearest_etf_solve(Hbar.detach(), U_prox, self.delta, **kw)
        W = etf_classifier(U)
        b = -(W @ mu_G)
        with torch.no_grad():
            self.U_prox.copy_(U.detach())
            self.weight.copy_(W.detach())
            self.bias.copy_(b.detach())
            self.initialised.fill_(True)
        self.last_iterations = it
        return f @ W.mT + b

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        return self.weight.detach(), self.bias.detach()


class NormalisedHead(Head):
    """logits = head(tau h/||h||): Markou's feature normalisation in front of any head (Markou et al.
    2024 put it before their fixed ETF classifier)."""

    def __init__(self, head: Head, tau: float = DEFAULT_TAU) -> None:
        super().__init__()
        self.head, self.tau = head, check_positive("tau", tau)
        self.num_classes, self.feature_dim = head.num_classes, head.feature_dim

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.tau * F.normalize(h, dim=1))

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        return self.head.classifier()
