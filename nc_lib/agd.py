"""Automatic gradient descent (AGD): an optimiser without a learning rate, schedule or weight decay.

Bernstein, Mingard, Huang, Azizan & Yue (2023), "Automatic Gradient Descent: Deep Learning
without Hyperparameters" (arXiv 2304.05187; released code github.com/jxbz/agd). Markou, Ajanthan
& Gould (2024) trained their networks with it (REFERENCE.md section 3: no lr schedule, no weight
decay, no biases, batch norm without affine parameters).

For a network of L weight tensors W_1..W_L (matrices d_out x d_in, or convolution kernels
d_out x d_in x k_1 x ... x k_m), with the *singular value* of layer l

    s_l = sqrt(d_out / d_in)                       (a matrix)
    s_l = sqrt(d_out / d_in) / sqrt(k_1 ... k_m)   (a kernel; m = 2 for Conv2d: / sqrt(kh kw))

- **Initialisation** (:meth:`AGD.init_weights`): every matrix is a random semi-orthogonal matrix
  scaled by s_l, so all its singular values equal s_l; a kernel gets an independent semi-orthogonal
  d_out x d_in matrix at every kernel position, each scaled by s_l.
- **Step** (:meth:`AGD.step`), with g_l the gradient of the loss w.r.t. W_l:

      G   = (1/L) sum_l s_l ||g_l||_F
      eta = log((1 + sqrt(1 + 4 G)) / 2)
      W_l <- W_l - gain * (eta / L) * s_l * g_l / ||g_l||_F

  For kernels the released code takes the norm per kernel position (the Frobenius norm of the
  d_out x d_in slice g_l[:, :, i, j]): G sums s_l ||g_l[:, :, i, j]||_F over the positions too, and
  each slice is normalised by its own norm. This module does the same. A (slice of a) gradient
  with norm 0 is not moved (the released code's ``nan_to_num``); a parameter without a gradient
  counts in L but is not moved. ``gain`` (default 1) is the released code's ``--gain``.

AGD updates weight tensors only (dim >= 2): it has no rule for biases or normalisation
scales, and the released networks have none (``bias=False``, ``BatchNorm(affine=False)``).
:func:`agd_parameters` freezes a model's 1-D parameters (``requires_grad=False``) and returns its
weight tensors; :func:`reset_frozen_parameters` sets frozen biases to 0 and frozen normalisation
weights to 1, after which the network computes what the same network built without them computes.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .validation import check_positive

__all__ = ["AGD", "singular_value", "agd_eta", "agd_parameters", "reset_frozen_parameters"]


def singular_value(shape: torch.Size | tuple[int, ...]) -> float:
    """s = sqrt(d_out/d_in) for a d_out x d_in matrix; divided by sqrt(prod(kernel)) for a
    d_out x d_in x k_1 x ... kernel (Bernstein et al. 2023)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"AGD needs a weight matrix or kernel (dim >= 2); got a tensor of shape {shape}.")
    sv = math.sqrt(shape[0] / shape[1])
    kernel = math.prod(shape[2:])
    return sv / math.sqrt(kernel) if kernel > 1 else sv


def agd_eta(G: float | Tensor) -> float | Tensor:
    """AGD's automatic step size eta = log((1 + sqrt(1 + 4 G)) / 2) (a float or a tensor)."""
    if isinstance(G, Tensor):
        return torch.log((1 + torch.sqrt(1 + 4 * G)) / 2)
    return math.log((1 + math.sqrt(1 + 4 * float(G))) / 2)


def _slice_norms(g: Tensor) -> Tensor:
    """Frobenius norms of the d_out x d_in slices of ``g`` (one per kernel position), keepdim."""
    return torch.linalg.vector_norm(g, dim=(0, 1), keepdim=True)


class AGD(torch.optim.Optimizer):
    """Automatic gradient descent (Bernstein et al. 2023); formulas in the module docstring.

    ``params``: the network's weight tensors (dim >= 2), or parameter groups of them; L is their
    total number over all groups. A 1-D or 0-D parameter raises ValueError: freeze biases and
    normalisation scales (:func:`agd_parameters`) or build the network without them. ``gain``
    (> 0, finite) multiplies every update; a group may carry its own ``gain``.

    Call :meth:`init_weights` once before training (not when resuming from a checkpoint).
    :meth:`step` follows the torch convention (returns the closure's loss, if any); the step size
    eta of the latest step is kept as a 0-dim tensor in :attr:`last_eta` (no host synchronisation).
    AGD keeps no per-parameter state, so its ``state_dict`` holds the groups' ``gain`` only.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], gain: float = 1.0) -> None:
        gain = self._check_gain(gain)
        self.last_eta: Tensor | None = None
        super().__init__(params, defaults={"gain": gain})

    @staticmethod
    def _check_gain(gain: Any) -> float:
        gain = check_positive("gain", gain)
        if not math.isfinite(gain):
            raise ValueError(f"gain must be finite, got {gain}.")
        return gain

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["gain"] = self._check_gain(group["gain"])
        for p in group["params"]:
            if p.dim() < 2:
                raise ValueError(
                    f"params: AGD updates weight matrices and convolution kernels only (dim >= 2); got a parameter of "
                    f"shape {tuple(p.shape)}. Freeze biases and batch-norm scales (nc_lib.agd.agd_parameters) or build "
                    f"the network without them (bias=False, BatchNorm affine=False).")

    def _params(self) -> list[tuple[Tensor, float]]:
        return [(p, group["gain"]) for group in self.param_groups for p in group["params"]]

    @property
    def num_layers(self) -> int:
        """L, the number of weight tensors."""
        return sum(len(group["params"]) for group in self.param_groups)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Orthogonal initialisation scaled to singular value s_l (module docstring), in place, drawn
        from torch's global RNG (deterministic for a seed)."""
        for p, _ in self._params():
            sv = singular_value(p.shape)
            # drawn on the CPU in float32 (float64 for float64 weights): the same numbers on every device
            block = torch.empty(p.shape[0], p.shape[1], dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            for pos in itertools.product(*(range(k) for k in p.shape[2:])):
                nn.init.orthogonal_(block)
                p[(slice(None), slice(None), *pos)].copy_(block * sv)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One AGD step on the current gradients (module docstring). Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        L = len(params)
        terms, updates = [], []
        for p, gain in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("AGD does not support sparse gradients.")
            g = p.grad
            sv = singular_value(p.shape)
            norms = _slice_norms(g)
            terms.append(sv * norms.sum())
            updates.append((p, g, gain, sv, norms))
        if not terms:
            self.last_eta = None
            return loss
        G = torch.stack([t.to(terms[0].dtype) for t in terms]).sum() / L
        eta = agd_eta(G)
        for p, g, gain, sv, norms in updates:
            scale = torch.where(norms > 0, sv / norms, torch.zeros_like(norms))
            p.sub_(g * (scale * (gain / L) * eta).to(p.dtype))
        self.last_eta = eta.detach()
        return loss


def agd_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every trainable parameter of dim < 2 of ``model`` (``requires_grad=False``; biases,
    batch-norm scales and shifts) and return the trainable weight tensors (dim >= 2) for :class:`AGD`."""
    weights = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            p.requires_grad_(False)
        else:
            weights.append(p)
    return weights


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def reset_frozen_parameters(model: nn.Module) -> None:
    """Set the frozen (``requires_grad=False``) 1-D parameters to the values of a network built
    without them: normalisation weights to 1 and every parameter named ``bias`` to 0. Then
    ``BatchNorm`` computes what ``BatchNorm(affine=False)`` computes and a layer what it computes
    with ``bias=False`` (the released AGD networks). Other frozen 1-D parameters keep their values."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad or p.dim() >= 2:
                continue
            if name == "bias":
                p.zero_()
            elif name == "weight" and isinstance(module, _NORMS):
                p.fill_(1.0)
