"""The theory of the unconstrained features model: its global minimum, its saddles, the tools that probe them.

For the regularised UFM of :mod:`nc_lib.ufm` (Zhu et al. 2021; REFERENCE.md section 3),

    f(W, H, b) = (1/N) sum_i CE(W h_i + b, y_i) + lambda_W/2 ||W||_F^2 + lambda_H/2 ||H||_F^2 + lambda_b/2 ||b||^2,

* :func:`ufm_global_minimum` (Theorem 3.1): the global minimiser and the optimal objective value,
  from the 1-D convex problem in the classifier norm (:func:`theorem_objective_1d`) solved to machine
  precision, with its closed form :func:`theorem_rho_closed_form`;
* :class:`UFMObjective`: f as a function of one flat vector, with gradients and Hessian-vector
  products through ``torch.autograd``; :func:`lanczos_smallest` and :func:`power_iteration_smallest`:
  the most negative Hessian eigenvalue;
* :func:`origin_saddle`: the strict saddle at the origin, with its analytic least Hessian eigenvalue
  (Theorem 3.2: every critical point that is not a global minimiser is a strict saddle);
* :func:`planar_angles`: the geometry the minimiser takes when d < C-1 (no simplex ETF fits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import etf
from .ufm import LOSSES, UFMConfig, as_config, ufm_labels, ufm_objective
from .validation import check_choice, check_int, check_nonnegative, check_positive


# --------------------------------------------------------------------------- the theorem
@dataclass
class UFMGlobalMinimum:
    """Zhu et al. 2021, Theorem 3.1: the global minimiser (W, H, b) and the optimal objective.

    ``rho`` = ||w_c||^2, ``feature_scale`` s = sqrt(lambda_W/(lambda_H n)) with h_{c,i} = s w_c,
    ``trivial`` when the regularisation is so strong that W = H = 0 is optimal.
    """

    W: Tensor
    H: Tensor
    b: Tensor
    labels: Tensor
    objective: float
    rho: float
    feature_scale: float
    trivial: bool

    @property
    def classifier_norm(self) -> float:
        """||w_c|| (every row)."""
        return math.sqrt(self.rho)

    @property
    def feature_norm(self) -> float:
        """||h_{c,i}|| (every feature)."""
        return self.feature_scale * math.sqrt(self.rho)


def _theorem_constants(C: int, n: int, lambda_W: float, lambda_H: float) -> tuple[float, float]:
    s = math.sqrt(lambda_W / (lambda_H * n))
    a = s * C / (C - 1)
    return s, a


def theorem_objective_1d(rho: float, C: int, n: int, lambda_W: float, lambda_H: float) -> float:
    """g(rho) = log(1 + (C-1) exp(-a rho)) + C lambda_W rho, a = s C/(C-1), s = sqrt(lambda_W/(lambda_H n)).

    This is f on the family W = sqrt(rho) * (unit simplex ETF), h_{c,i} = s w_c, b = 0: every
    sample's logit margin is s rho C/(C-1), and lambda_W/2 ||W||^2 = lambda_H/2 ||H||^2 = C lambda_W rho/2.
    """
    s, a = _theorem_constants(C, n, lambda_W, lambda_H)
    x = math.log(C - 1) - a * rho
    softplus = x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))
    return softplus + C * lambda_W * rho


def _solve_rho(C: int, n: int, lambda_W: float, lambda_H: float) -> float:
    """Minimise the convex g of :func:`theorem_objective_1d` over rho >= 0 by bisection on
    g'(rho) = C lambda_W - a / (1 + exp(a rho)/(C-1)) to machine precision."""
    s, a = _theorem_constants(C, n, lambda_W, lambda_H)
    k = C * lambda_W

    def dg(r: float) -> float:
        z = a * r - math.log(C - 1)
        return k - a * (math.exp(-z) / (1 + math.exp(-z)) if z > 0 else 1 / (1 + math.exp(z)))

    if dg(0.0) >= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while dg(hi) < 0:
        lo, hi = hi, 2 * hi
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if dg(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def theorem_rho_closed_form(C: int, n: int, lambda_W: float, lambda_H: float) -> float:
    """rho* = (1/a) log((C-1)(a - C lambda_W)/(C lambda_W)) when s > C lambda_W, else 0 (a, s as above).

    From g'(rho) = 0: (C-1)e^{-a rho}/(1 + (C-1)e^{-a rho}) = C lambda_W / a."""
    s, a = _theorem_constants(C, n, lambda_W, lambda_H)
    k = C * lambda_W
    if s <= k:
        return 0.0
    return math.log((C - 1) * (a - k) / k) / a


def ufm_global_minimum(C: int, n: int, d: int, lambda_W: float, lambda_H: float, lambda_b: float = 0.0, *,
                       rotate: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64) -> UFMGlobalMinimum:
    """The global minimiser of the regularised CE UFM (Zhu et al. 2021, Theorem 3.1), balanced, d >= C-1.

    Every global minimiser has W = sqrt(rho*) E with E a unit simplex ETF (rows, C x d),
    h_{c,i} = sqrt(lambda_W/(lambda_H n)) w_c and b = b* 1 (b* = 0 when lambda_b > 0; with
    lambda_b = 0 any constant works and we return 0). rho* minimises the 1-D convex function
    :func:`theorem_objective_1d`; it is found here by bisection on its derivative to machine
    precision (it also has the closed form :func:`theorem_rho_closed_form`). If
    C sqrt(n lambda_W lambda_H) >= 1, rho* = 0: the minimiser is W = H = 0 with objective log C.
    E is :func:`nc_lib.etf.simplex_etf` (canonical, or a random rotation with ``rotate``).
    """
    C = check_int("C", C, 2)
    n = check_int("n", n, 1)
    d = check_int("d", d, 1)
    lambda_W = check_positive("lambda_W", lambda_W)
    lambda_H = check_positive("lambda_H", lambda_H)
    check_nonnegative("lambda_b", lambda_b)
    if d < C - 1:
        raise ValueError(f"Theorem 3.1 needs d >= C-1 = {C - 1} (a simplex ETF must fit); got d={d}. "
                         "For d < C-1 train the UFM and look at what the features do (notebook 02).")
    rho = _solve_rho(C, n, lambda_W, lambda_H)
    s, _ = _theorem_constants(C, n, lambda_W, lambda_H)
    E = etf.simplex_etf(C, d, rotate=rotate, seed=seed, dtype=torch.float64)
    W = math.sqrt(rho) * E
    labels = ufm_labels([n] * C)
    H = s * W[labels]
    b = torch.zeros(C, dtype=torch.float64)
    obj = theorem_objective_1d(rho, C, n, lambda_W, lambda_H)
    return UFMGlobalMinimum(W.to(dtype), H.to(dtype), b.to(dtype), labels, obj, rho, s, rho == 0.0)


def ufm_optimal_objective(C: int, n: int, lambda_W: float, lambda_H: float) -> float:
    """The minimum value of the regularised CE UFM objective (Theorem 3.1; independent of d >= C-1 and lambda_b)."""
    C = check_int("C", C, 2)
    n = check_int("n", n, 1)
    lambda_W = check_positive("lambda_W", lambda_W)
    lambda_H = check_positive("lambda_H", lambda_H)
    return theorem_objective_1d(_solve_rho(C, n, lambda_W, lambda_H), C, n, lambda_W, lambda_H)


# --------------------------------------------------------------------------- landscape: Hessian tools
class UFMObjective:
    """f(theta) with theta = [vec(W); vec(H); b] one flat vector (LinearHead UFM), for gradients and
    Hessian-vector products by double backpropagation."""

    def __init__(self, labels: Tensor, num_classes: int, feature_dim: int, *, loss: str = "ce",
                 lambda_W: float = 5e-4, lambda_H: float = 5e-4, lambda_b: float = 5e-4, bias: bool = True) -> None:
        self.labels = torch.as_tensor(labels).long()
        self.C = check_int("num_classes", num_classes, 2)
        self.d = check_int("feature_dim", feature_dim, 1)
        self.N = self.labels.numel()
        self.loss = check_choice("loss", loss, LOSSES)
        self.lambdas = (check_nonnegative("lambda_W", lambda_W), check_nonnegative("lambda_H", lambda_H),
                        check_nonnegative("lambda_b", lambda_b))
        self.bias = bias
        self.dim = self.C * self.d + self.N * self.d + (self.C if bias else 0)

    @classmethod
    def from_config(cls, config: UFMConfig | dict[str, Any]) -> "UFMObjective":
        cfg = as_config(config)
        return cls(ufm_labels(cfg.counts()), cfg.num_classes, cfg.feature_dim, loss=cfg.loss,
                   lambda_W=cfg.lambda_W, lambda_H=cfg.lambda_H, lambda_b=cfg.lambda_b, bias=cfg.bias)

    def pack(self, W: Tensor, H: Tensor, b: Tensor | None = None) -> Tensor:
        parts = [torch.as_tensor(W, dtype=torch.float64).reshape(-1), torch.as_tensor(H, dtype=torch.float64).reshape(-1)]
        if self.bias:
            parts.append(torch.zeros(self.C, dtype=torch.float64) if b is None else torch.as_tensor(b, dtype=torch.float64).reshape(-1))
        theta = torch.cat(parts)
        if theta.numel() != self.dim:
            raise ValueError(f"W, H, b have {theta.numel()} entries; expected {self.dim} (C={self.C}, d={self.d}, N={self.N}).")
        return theta

    def unpack(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        cd, nd = self.C * self.d, self.N * self.d
        W = theta[:cd].reshape(self.C, self.d)
        H = theta[cd:cd + nd].reshape(self.N, self.d)
        b = theta[cd + nd:] if self.bias else None
        return W, H, b

    def __call__(self, theta: Tensor) -> Tensor:
        W, H, b = self.unpack(theta)
        lw, lh, lb = self.lambdas
        return ufm_objective(W, H, b, self.labels, loss=self.loss, lambda_W=lw, lambda_H=lh, lambda_b=lb)

    def gradient(self, theta: Tensor) -> Tensor:
        t = theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self(t), t)
        return g.detach()

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """Hessian-vector product nabla^2 f(theta) v by double backpropagation."""
        t = theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self(t), t, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v.to(g), t)
        return hv.detach()


def lanczos_smallest(hvp: Callable[[Tensor], Tensor], dim: int, *, iterations: int = 60, seed: int = 0,
                     dtype: torch.dtype = torch.float64) -> tuple[float, Tensor, Tensor]:
    """Lanczos with full reorthogonalisation on a symmetric operator v -> A v.

    Returns (smallest Ritz value, its unit Ritz vector, all Ritz values ascending). With
    ``iterations`` >= dim it is exact up to rounding."""
    dim = check_int("dim", dim, 1)
    m = min(check_int("iterations", iterations, 1), dim)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=g, dtype=dtype)
    q = q / q.norm()
    Q = torch.zeros(m, dim, dtype=dtype)
    alpha = torch.zeros(m, dtype=dtype)
    beta = torch.zeros(m, dtype=dtype)
    k = m
    for j in range(m):
        Q[j] = q
        w = hvp(q).to(dtype)
        alpha[j] = w @ q
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)  # full reorthogonalisation (twice is enough)
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        bnorm = w.norm()
        if j + 1 < m:
            if bnorm < 1e-12 * max(1.0, float(alpha[: j + 1].abs().max())):
                k = j + 1
                break
            beta[j] = bnorm
            q = w / bnorm
    T = torch.diag(alpha[:k]) + torch.diag(beta[: k - 1], 1) + torch.diag(beta[: k - 1], -1)
    evals, evecs = torch.linalg.eigh(T)
    v = Q[:k].T @ evecs[:, 0]
    return float(evals[0]), v / v.norm(), evals


def power_iteration_smallest(hvp: Callable[[Tensor], Tensor], dim: int, shift: float, *, iterations: int = 500,
                             seed: int = 0) -> tuple[float, Tensor]:
    """Smallest eigenvalue by power iteration on (shift I - A), shift >= the largest eigenvalue.

    Slower than :func:`lanczos_smallest`; here as the simple, transparent alternative."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    v = v / v.norm()
    for _ in range(check_int("iterations", iterations, 1)):
        w = shift * v - hvp(v)
        v = w / w.norm()
    return float(v @ hvp(v)), v


@dataclass
class OriginSaddle:
    """The critical point W = 0, H = 0, b = 0 of the balanced CE UFM, and its Hessian's least eigenvalue.

    At the origin every logit is 0, so the gradient is (1/N) sum_i (1/C - e_{y_i}) h_i^T = 0 in W,
    W^T(...) = 0 in H and (1/N) sum_i (1/C - e_{y_i}) + lambda_b b = 0 in b (balanced classes).
    The second-order part of f is (1/N) sum_i (1/C 1 - e_{y_i})^T W h_i + lambda_W/2||W||^2 +
    lambda_H/2||H||^2 + (b-terms): the coupling has operator norm gamma = sqrt(n)/N = 1/(C sqrt n)
    (the centred one-hot matrix has singular value sqrt(n)), so the least Hessian eigenvalue is

        lambda_WH = (lambda_W + lambda_H)/2 - sqrt(((lambda_W - lambda_H)/2)^2 + gamma^2)

    on the (W, H) block, negative exactly when C sqrt(n lambda_W lambda_H) < 1, which is also
    exactly when the global minimum is non-trivial (rho* > 0): then the origin is a strict saddle
    with f = log C > f*. The b block, (I - 11^T/C)/C + lambda_b I, has eigenvalues lambda_b and
    1/C + lambda_b and no coupling to (W, H) at the origin, so the least Hessian eigenvalue is
    ``analytic_min_eigenvalue`` = min(lambda_WH, lambda_b).
    """

    objective: UFMObjective
    theta: Tensor
    value: float
    gradient_norm: float
    analytic_min_eigenvalue: float
    wh_block_min_eigenvalue: float


def origin_saddle(C: int, n: int, d: int, lambda_W: float, lambda_H: float, lambda_b: float = 5e-4) -> OriginSaddle:
    """The origin as a critical point of the balanced CE UFM, with its analytic least Hessian eigenvalue."""
    C, n, d = check_int("C", C, 2), check_int("n", n, 1), check_int("d", d, 1)
    obj = UFMObjective(ufm_labels([n] * C), C, d, loss="ce", lambda_W=lambda_W, lambda_H=lambda_H, lambda_b=lambda_b)
    theta = torch.zeros(obj.dim, dtype=torch.float64)
    gamma = 1.0 / (C * math.sqrt(n))
    lam = (lambda_W + lambda_H) / 2 - math.sqrt(((lambda_W - lambda_H) / 2) ** 2 + gamma ** 2)
    return OriginSaddle(obj, theta, float(obj(theta)), float(obj.gradient(theta).norm()), min(lam, lambda_b), lam)


# --------------------------------------------------------------------------- d < C-1
def planar_angles(V: Tensor) -> Tensor:
    """For C vectors in R^2 (rows), the sorted angular gaps between consecutive directions (radians).

    A regular C-gon has every gap 2 pi / C: with d = 2 < C-1 the CE UFM's classifier rows form one for
    C = 5 (lambdas 1e-3, n = 10); for C = 6 the minimiser instead parks one class at the origin (W row 0,
    features 0, recognised through its bias) and puts the other five on a regular pentagon (notebook 02)."""
    V = torch.as_tensor(V, dtype=torch.float64)
    if V.ndim != 2 or V.shape[1] != 2:
        raise ValueError(f"V must be a (C x 2) matrix; got shape {tuple(V.shape)}.")
    ang = torch.sort(torch.atan2(V[:, 1], V[:, 0])).values
    gaps = torch.diff(torch.cat([ang, ang[:1] + 2 * math.pi]))
    return torch.sort(gaps).values
