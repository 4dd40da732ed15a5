"""What Markou et al. (2024)'s heads cost: time and memory per training step; how the node's solver converges.

Cost (:func:`measure_cost`, Fig. 5): forward and backward wall time per step of each head on a fixed body,
and memory (:func:`measure_memory`, Table 3): bytes of the tensors autograd saves for the backward of one step
(activations, incl. the node's) plus parameters, buffers and gradients -- a measurement on any
device; on CUDA also ``torch.cuda.max_memory_allocated``. :func:`solver_convergence`: the Riemannian
trust-region solver against the closed form, iteration by iteration (for teaching).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nearest_etf import apply_mt, kkt_memory_bytes, polar_factor, riemannian_polar
from ...validation import check_int
from .grid import METHODS, make_head

def _logits(head: nn.Module, h: Tensor, labels: Tensor) -> Tensor:
    return head(h, labels) if (head.training and getattr(head, "needs_labels", False)) else head(h)


def _stratified_batch(C: int, batch: int, d_in: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(batch) % C
    return torch.randn(batch, d_in, generator=g), y


def _body(d_in: int, d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d))


def measure_cost(num_classes: int, feature_dim: int, *, methods: Sequence[str] = METHODS + ("implicit_etf_riemannian",),
                 batch_size: int = 256, steps: int = 20, warmup: int = 3, d_in: int = 64, hidden: int = 256,
                 body: Callable[[], nn.Module] | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Wall time of forward (body + head + CE) and backward per training step for each method, on one
    body and a batch with every class (C <= batch_size) -- measured, ``steps`` steps after ``warmup``.
    Returns ``{method: {"forward_s": [...], "backward_s": [...], "iterations": [...]}}`` (the Riemannian
    solver's iteration counts; closed form: 0)."""
    C, d = check_int("num_classes", num_classes, 2), check_int("feature_dim", feature_dim, 2)
    if d < C:
        raise ValueError(f"feature_dim must be >= num_classes; got {d} < {C}.")
    out = {}
    for m in methods:
        torch.manual_seed(seed)
        net = body() if body is not None else _body(d_in, d, hidden)
        head = make_head(m, d, C)
        params = [p for p in list(net.parameters()) + list(head.parameters()) if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3)
        fwd, bwd, its = [], [], []
        for s in range(warmup + steps):
            x, y = _stratified_batch(C, batch_size, d_in, seed + s) if body is None else body.batch(s)  # type: ignore[attr-defined]
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(_logits(head, net(x), y), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            if s >= warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                its.append(int(getattr(head, "last_iterations", 0)))
        out[m] = {"forward_s": fwd, "backward_s": bwd, "iterations": its}
    return out


def measure_memory(num_classes: int, feature_dim: int, *, methods: Sequence[str] = METHODS, batch_size: int = 256,
                   d_in: int = 64, hidden: int = 256, ufm_n: int | None = None) -> dict[str, dict[str, float]]:
    """Memory of one training step per method, measured: the bytes of every distinct tensor autograd
    saves for the backward (``torch.autograd.graph.saved_tensors_hooks``, plus the tensors and arrays
    custom Functions keep on ``ctx``, e.g. the node's SVD factors), plus parameters, buffers and gradients; on CUDA also the peak allocated. The head's own
    share (``head_saved_bytes``) is what is saved after the body's output exists. ``ufm_n``: a UFM step
    instead (no body; the features are a free C*ufm_n x d parameter, full batch).
    ``kkt_dense_bytes`` (implicit heads): the size of the paper's dense KKT matrix for this (C, d), computed
    by :func:`nc_lib.nearest_etf.kkt_memory_bytes` (not built)."""
    C, d = check_int("num_classes", num_classes, 2), check_int("feature_dim", feature_dim, 2)
    out = {}
    for m in methods:
        torch.manual_seed(0)
        head = make_head(m, d, C)
        if ufm_n is None:
            net: nn.Module = _body(d_in, d, hidden)
            x, y = _stratified_batch(C, batch_size, d_in)
        else:
            n = check_int("ufm_n", ufm_n, 1)
            free = nn.Parameter(torch.randn(C * n, d) / math.sqrt(d))
            net = _FreeFeatures(free)
            x, y = torch.empty(0), torch.arange(C).repeat_interleave(n)
        seen: dict[tuple[int, int], int] = {}

        def pack(t: Tensor) -> Tensor:
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                seen[key] = t.untyped_storage().nbytes()
            except Exception:  # noqa: BLE001 - sparse or wrapper tensors: count their elements
                seen[(id(t), 0)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = net(x)
            n_body = sum(seen.values())
            loss = F.cross_entropy(_logits(head, h, y), y)
        seen.update(_ctx_saved(loss.grad_fn))
        saved = sum(seen.values())
        loss.backward()
        static = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(head.parameters())
                     + list(net.buffers()) + list(head.buffers()))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in list(net.parameters()) + list(head.parameters())
                    if p.grad is not None)
        out[m] = {"saved_bytes": float(saved), "head_saved_bytes": float(saved - n_body),
                  "static_bytes": float(static), "grad_bytes": float(grads), "total_bytes": float(saved + static + grads),
                  "kkt_dense_bytes": float(kkt_memory_bytes(C, d, torch.float32)) if m.startswith("implicit") else 0.0}
    return out


def _ctx_saved(root: Any) -> dict[tuple[int, int], int]:
    """Tensors and arrays that custom autograd Functions keep as ``ctx`` attributes (not through
    ``save_for_backward``, so the saved-tensor hooks miss them): walk the graph from ``root``."""
    found: dict[tuple[int, int], int] = {}
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for v in getattr(node, "__dict__", {}).values():
            if isinstance(v, Tensor):
                st = v.untyped_storage()
                found[(st.data_ptr(), st.nbytes())] = st.nbytes()
            elif isinstance(v, np.ndarray):
                base = v if v.base is None else v.base
                found[(id(base), base.nbytes)] = int(base.nbytes)
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))
    return found


class _FreeFeatures(nn.Module):
    """The UFM's 'body': returns the free features whatever the input."""

    def __init__(self, H: nn.Parameter) -> None:
        super().__init__()
        self.H = H

    def forward(self, x: Tensor) -> Tensor:
        return self.H * 1.0


# =========================================================================== the solver, for teaching
def solver_convergence(num_classes: int = 5, feature_dim: int = 8, *, delta: float = 1e-3, max_iter: int = 12,
                       perturbation: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """The Riemannian trust-region solver against the closed form on a random problem.

    Hbar random (d x C, centred, unit norm); U_prox the previous step's solution, simulated as the nearest ETF
    of Hbar + perturbation * noise (as in training, where the means move a little per step; a large
    perturbation is a far start); Z = Hbar Mt + (delta/2) U_prox; for k = 0..max_iter the solver's iterate after
    k iterations (warm-started at U_prox, as the paper) and
    ``dist[k] = ||U_k - polar(Z)||_F`` and ``gap[k] = <Z, polar(Z)> - <Z, U_k>`` (>= 0: the objective gap, the
    closed form maximises <Z, U>); also the singular values of Z (the smallest is ~delta/2: why delta)."""
    C, d = check_int("num_classes", num_classes, 2), check_int("feature_dim", feature_dim, 2)
    if d < C:
        raise ValueError(f"feature_dim must be >= num_classes; got {d} < {C}.")
    max_iter = check_int("max_iter", max_iter, 0)
    g = torch.Generator().manual_seed(seed)
    Hb = torch.randn(d, C, generator=g, dtype=torch.float64)
    Hb = Hb - Hb.mean(1, keepdim=True)
    Hb = Hb / Hb.norm()
    if perturbation < 0:
        raise ValueError(f"perturbation must be >= 0; got {perturbation}.")
    P = Hb + perturbation * torch.randn(d, C, generator=g, dtype=torch.float64)
    U0, _, _ = polar_factor(apply_mt(P) + 1e-3 * torch.eye(d, C, dtype=torch.float64), "svd")
    Z = apply_mt(Hb) + delta / 2 * U0
    U_star, _, _ = polar_factor(Z, "svd")
    best = float((Z * U_star).sum())
    dist, gap, iters = [], [], []
    for k in range(max_iter + 1):
        Uk, it = riemannian_polar(Z, U0, max_iter=k, tol=0.0) if k else (U0, 0)
        dist.append(float((Uk - U_star).norm()))
        gap.append(max(best - float((Z * Uk).sum()), 0.0))
        iters.append(k)
    sv = torch.linalg.svdvals(Z)
    sv0 = torch.linalg.svdvals(apply_mt(Hb))
    return {"iterations": iters, "dist": dist, "gap": gap, "singular_values": sv.tolist(),
            "singular_values_delta0": sv0.tolist(), "delta": delta, "C": C, "d": d, "perturbation": perturbation}
