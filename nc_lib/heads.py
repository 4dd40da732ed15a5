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

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .etf import simplex_etf
from . import nearest_etf as nearest_etf_module
from .nearest_etf import (DEFAULT_DELTA, DEFAULT_TAU, POLAR_METHODS, SOLVERS, FeatureMeanTracker, _newton_schulz,
                          check_dims, etf_classifier, fused_step_host, host_scalar, nearest_etf_node,
                          nearest_etf_solve, set_host_scalar)
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


_NORM_EPS = 1e-12  # F.normalize's eps


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

    The fused step. With the closed form (``polar_method`` "auto" or "gram"), every training step after the
    first runs as one autograd node (:class:`_ImplicitETFStep`): the tracker's update, the node and the
    classifier in a few dozen dispatches forward and backward, and one host synchronisation, the read-back
    of the 2C x 2C Gram of ``[H | U_prox]`` whose C x C algebra (the eigendecomposition, the backward's
    constants) runs on the host in float64 (:func:`~nc_lib.nearest_etf.fused_step_host`); the step counter
    and the ``initialised`` flag are mirrored on the host (:func:`~nc_lib.nearest_etf.host_scalar`). Per step
    (B = 128, d = 512, C = 10; forward, cross-entropy, backward) that is 71 top-level aten ops and one host
    synchronisation, against 179 and 9 for the general route (the tracker, then
    :func:`~nc_lib.nearest_etf.nearest_etf_node`, then the classifier, each through autograd) on a GPU and 16
    and 0 for :class:`LinearHead`; see ``benchmarks/bench_implicit_head.py``. The general route still runs the
    first step, the Riemannian solver, ``polar_method="svd"``, a tracker summed over ranks (``across_ranks``),
    and any step the fused one declines after its read-back (labels out of range, NaN or Inf, H = 0, a Gram too
    ill-conditioned for the Gram route): it raises the errors, or takes the SVD, as before, and nothing has
    changed the state by then. On the CPU, where a synchronisation costs nothing, problems with d C^2 above
    ``nearest_etf.NUMPY_MAX_WORK`` also take the general route (its d x C products are smaller).
    ``fused_step``: None (that choice), True (the fused step wherever it applies) or False (the general route
    always: the reference the tests compare the fused step with). Differences from the general route: numbers
    equal to float rounding; half-precision inputs are normalised in float32 (as the general route does under
    autocast), autocast does not lower the fused step's products (its logits are float32), and its backward is
    not differentiable again (``create_graph`` gives gradients, not second derivatives).
    """

    needs_labels = True
    fused_step: bool | None = None

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
        if not self.training:
            f = self.tracker.normalise(h)
            return f @ self.weight.to(f.dtype).mT + self.bias.to(f.dtype)
        if labels is None:
            raise ValueError("ImplicitETFHead needs the labels in training mode: call head(h, labels) "
                             "(its feature means are class means); in eval mode call head(h).")
        out = self._fused_forward(h, labels) if self.fused_step is not False else None
        return out if out is not None else self._general_forward(h, labels)

    def _general_forward(self, h: Tensor, labels: Tensor) -> Tensor:
        """The training step through the tracker, the node and the classifier, each differentiated by autograd."""
        f = self.tracker.normalise(h)
        # NaN or Inf in h: a ValueError from the tracker, before its state changes (one scalar check; on a GPU,
        # one host sync)
        Hbar, mu_G = self.tracker.update_normalised(f, labels, name="ImplicitETFHead: the features h")
        if host_scalar(self, "initialised"):
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
        set_host_scalar(self, "initialised", True)
        self.last_iterations = it
        return f @ W.mT + b

    def _constants(self, device: torch.device, dtype: torch.dtype) -> SimpleNamespace:
        """Per device and dtype, made once: ``classes`` = arange(C), ``tau_pc`` = tau sqrt(C/(C-1)) (I - 11^T/C),
        and ``V``, the float64 d x 2C work matrix [H | U_prox] of a step (written and read within the forward)."""
        key = (device, dtype, self.tracker.tau)
        cache = self.__dict__.setdefault("_fused_constants", {})
        if key not in cache:
            C, tau = self.num_classes, self.tracker.tau
            pc = tau * math.sqrt(C / (C - 1)) * (torch.eye(C, dtype=torch.float64) - 1.0 / C)
            cache[key] = SimpleNamespace(classes=torch.arange(C, device=device), tau_pc=pc.to(device, dtype),
                                         V=torch.empty(self.feature_dim, 2 * C, dtype=torch.float64, device=device))
        return cache[key]

    def _fused_forward(self, h: Tensor, labels: Tensor) -> Tensor | None:
        """The fused training step (see the class docstring), or None where the general route must run."""
        tr, C = self.tracker, self.num_classes
        if (self.solver != "closed" or self.polar_method == "svd" or tr.across_ranks
                or not (isinstance(h, Tensor) and h.ndim == 2 and h.shape[0] > 0 and h.shape[1] == self.feature_dim
                        and h.is_floating_point())
                or not (isinstance(labels, Tensor) and labels.shape == h.shape[:1] and not labels.is_floating_point()
                        and not labels.is_complex() and labels.dtype != torch.bool)
                or not host_scalar(self, "initialised")):
            return None
        dev = h.device
        if (self.fused_step is None and dev.type == "cpu"
                and self.feature_dim * C * C > nearest_etf_module.NUMPY_MAX_WORK):
            return None  # on the CPU a synchronisation is free, and the general route's products are smaller
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        grad = torch.is_grad_enabled() and h.requires_grad
        no_autocast = (torch.autocast(dev.type, enabled=False) if torch.is_autocast_enabled(dev.type)
                       else contextlib.nullcontext())
        with torch.no_grad(), no_autocast:
            k = self._constants(dev, dt)
            if labels.device != dev:
                labels = labels.to(dev, non_blocking=True)
            x = h if h.dtype == dt else h.to(dt)
            nrm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            n_c = nrm.clamp_min(_NORM_EPS)
            f = torch.div(x, n_c).mul_(tr.tau)  # = tau F.normalize(h)
            mu = f.mean(0)
            fc = f - mu
            onehot = labels.unsqueeze(1) == k.classes  # a label outside [0, C) gives a zero row: see counts below
            counts = onehot.sum(0, dtype=dt)
            Yk = torch.div(onehot, counts.clamp_min(1))  # B x C: 1/n_c on the rows of class c
            X = fc.mT @ Yk  # d x C: class means minus the batch mean
            t = host_scalar(tr, "step")
            w = counts.clamp(max=tr.rate(t + 1))  # a_t for a class in the batch, 0 for an absent one
            H_prev = tr.H if tr.H.dtype == dt else tr.H.to(dt)
            H = torch.lerp(H_prev, X, w)  # H_prev + a_t (X - H_prev); an absent class keeps its column
            U_prox = self.U_prox if self.U_prox.dtype == dt else self.U_prox.to(dt)
            V = torch.cat([H, U_prox], dim=1, out=k.V)  # d x 2C, float64 (cat converts)
            Kg = V.mT @ V
            # the step's one host synchronisation: the Gram, and the class counts (they sum to B unless a label
            # lies outside [0, C); cat converts them to float64)
            host = torch.cat([Kg.view(-1), counts]).cpu().numpy()
            nK = 4 * C * C
            if host[nK:].sum() != h.shape[0]:
                return None
            sol = fused_step_host(host[:nK].reshape(2 * C, 2 * C), C, self.delta, dt,
                                  grad and self.backprop_through_node)
            if sol is None:
                return None
            st = SimpleNamespace(dev=dev, dt=dt, k=k, step=t, f=f, n_c=n_c, mask=nrm >= _NORM_EPS, mu=mu, fc=fc,
                                 Yk=Yk, w=w, H=H, V=V, sol=sol)
        with no_autocast:
            out = _ImplicitETFStep.apply(h, self, st)
        self.last_iterations = 0
        return out

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        return self.weight.detach(), self.bias.detach()


def _upload(x, device: torch.device) -> Tensor:
    """A host array or CPU tensor on ``device``, without waiting (from pageable memory, CUDA stages the copy)."""
    return (torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(device, non_blocking=True)


class _ImplicitETFStep(torch.autograd.Function):
    """One fused training step of :class:`ImplicitETFHead`, ``h -> logits``, as one autograd node.

    Forward (given what :meth:`ImplicitETFHead._fused_forward` computed up to its host read-back: f = tau
    h/||h||, mu, fc = f - mu, Yk (B x C, 1/n_c on the rows of class c), H = lerp(H_prev, fc^T Yk, w), V = [H |
    U_prox], and the host's solve): ``[U | W^T | A] = V R`` (one product; a Newton-Schulz step first where it
    is due), ``logits = fc W^T`` (= f W^T + b with b = -W mu), and the state: H, U_prox, W, b, the step.

    Backward, for G = dL/dlogits (everything scaled by tau by starting from ``tau Pc``, so that the last line
    needs no extra product):

        G Pc' = tau G Pc;   tau dL/dfc = (G Pc') U^T  [+ Yk (tau dL/dX)^T through the node];
        tau dL/dU = fc^T (G Pc');   the node (:class:`~nc_lib.nearest_etf.NearestETFFunction`'s formula with
        A = U B):  What = A^T (tau dL/dU) B,  Y = What o P1 - What^T o P2,
        tau dL/dHbar / n = (tau dL/dU) (N Cc/n) + A (Y (B^T Cc/n));   Hbar = H/n:  dL/dH = g - H <H, g>/n^2;
        dL/dX = w o dL/dH (lerp; an absent class, w = 0, gets none);   dL/df = dL/dfc - mean_rows(dL/dfc);
        dL/dh = (tau dL/df - f <f, tau dL/df>/tau^2 [||h|| >= eps]) / max(||h||, eps)   (F.normalize's).
    """

    @staticmethod
    def forward(ctx, h: Tensor, head: ImplicitETFHead, st: SimpleNamespace) -> Tensor:
        C, sol, dev = head.num_classes, st.sol, st.dev
        R = _upload(sol.R, dev)
        if sol.after is None:
            UWA = st.V @ R
        else:  # eps cond(Z)^2 too large for the output's dtype: one Newton-Schulz step on U first
            UWA = _newton_schulz(st.V @ R) @ _upload(sol.after, dev)
        if UWA.dtype != st.dt:
            UWA = UWA.to(st.dt)
        parts = UWA.split(C, dim=1)
        U, Wt = parts[0], parts[1]
        W = Wt.mT
        logits = st.fc @ Wt
        if head.bias.dtype == st.dt:  # b = -W mu (beta = 0: the bias buffer's old values are ignored)
            b = torch.addmv(head.bias, W, st.mu, beta=0, alpha=-1)
        else:
            b = torch.mv(W, st.mu).neg_()
        tr = head.tracker
        torch._foreach_copy_([tr.H, head.U_prox, head.weight, head.bias], [st.H, U, W, b])
        tr.step.add_(1)
        set_host_scalar(tr, "step", st.step + 1)
        ctx.tau, ctx.tau_pc, ctx.through = tr.tau, st.k.tau_pc, sol.consts is not None
        if ctx.through:
            ctx.consts, ctx.inv_norm2 = sol.consts, sol.inv_norm2
            ctx.save_for_backward(st.f, st.n_c, st.mask, U, st.fc, st.Yk, st.H, parts[2], st.w)
        else:
            ctx.save_for_backward(st.f, st.n_c, st.mask, U)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        f, n_c, mask, U, *rest = ctx.saved_tensors
        no_autocast = (torch.autocast(f.device.type, enabled=False) if torch.is_autocast_enabled(f.device.type)
                       else contextlib.nullcontext())
        with no_autocast:
            if grad.dtype != f.dtype:
                grad = grad.to(f.dtype)
            gP = grad @ ctx.tau_pc  # tau G Pc
            g = gP @ U.mT  # tau dL/dfc through the logits
            if ctx.through:
                fc, Yk, H, A, w = rest
                B, P1, P2, NC, BtC = _upload(ctx.consts, f.device).unbind(0)
                gU = fc.mT @ gP  # tau dL/dU
                What = (A.mT @ gU) @ B
                Y = torch.addcmul(What * P1, What.mT, P2, value=-1.0)
                gH = torch.addmm(gU @ NC, A, Y @ BtC)  # tau dL/dHbar / ||H||
                gX = torch.addcmul(gH, H, (H * gH).sum(), value=-ctx.inv_norm2).mul_(w)  # tau dL/dX
                g = torch.addmm(g, Yk, gX.mT)
            g = g.sub_(g.mean(0))  # tau dL/df
            rd = (f * g).sum(1, keepdim=True).mul_(mask)
            gh = torch.addcmul(g, f, rd, value=-1.0 / (ctx.tau * ctx.tau)).div_(n_c)
        return gh, None, None


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
