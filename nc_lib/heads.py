"""Classifier heads: the last linear layer, pluggable into the UFM and every network.

A head maps penultimate features ``h`` (B x d) to logits (B x C). Every head exposes its
current classifier through :meth:`Head.classifier` as ``(W, b)`` with ``W`` of shape (C x d)
and ``b`` of shape (C,) or ``None``; that is what the collapse measurements read.

- :class:`LinearHead`: the ordinary learned classifier ``W h + b``.
- :class:`FixedETFHead`: Zhu et al. 2021's fixed classifier, the canonical simplex ETF in the
  first C coordinates, frozen (no gradient, no parameters), with an optional bias.
- The implicit ETF head of Markou et al. 2024 lives in :mod:`nc_lib.nearest_etf`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .etf import simplex_etf
from .validation import check_choice, check_int


class Head(nn.Module):
    """Base class: ``forward(h) -> logits`` and ``classifier() -> (W, b)``."""

    num_classes: int
    feature_dim: int

    def classifier(self) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - interface
        raise NotImplementedError


class LinearHead(Head):
    """Learned linear classifier: logits = W h + b, W (C x d)."""

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

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h)

    def classifier(self) -> tuple[Tensor, Tensor | None]:
        b = self.linear.bias
        return self.linear.weight.detach(), None if b is None else b.detach()


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
