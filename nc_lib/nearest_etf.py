"""The nearest simplex ETF as a differentiable node (Markou, Ajanthan & Gould 2024): tracker, solvers, backward.

REFERENCE.md section 4 works out the maths; this module follows it.

Notation. C classes, feature dimension d (>= C). ``Mt = (I_C - 11^T/C)/sqrt(C-1)`` is the
normalised simplex-ETF Gram target (unit Frobenius norm, symmetric, ``Mt 1 = 0``). Matrices of
class means are stored as **columns** here (d x C), as in the paper; classifiers ``W`` are
(C x d) rows, as everywhere else in nc_lib.

Pieces
------
* :class:`FeatureMeanTracker` -- the running, normalised matrix of centred class means
  ``Hbar`` (Markou Sec. 3.2):  h <- tau h/||h||;  X_t = [mu_c(batch) - mu_G(batch)];
  H_t = a_t X_t + (1 - a_t) H_{t-1} (H_{t-1} detached), a_t = max(2/(t+1), 1e-4);
  Hbar = H_t/||H_t||_F.
* The inner problem (the "node") over the Stiefel manifold ``U^T U = I_C``:

      U* = argmin_U ||Hbar - U Mt||_F^2 + (delta/2) ||U - U_prox||_F^2.

  On the manifold ||U Mt|| and ||U|| are constant, so this is orthogonal Procrustes:
  ``U* = polar(Z) = A B^T`` with ``Z = Hbar Mt + (delta/2) U_prox = A S B^T`` (thin SVD).
  :func:`polar_factor` computes it in closed form, :func:`riemannian_polar` with a Riemannian
  trust-region method (as the paper, which uses pymanopt: QR retraction, warm start, at most 30
  iterations). Both are reached through :func:`nearest_etf_node` (``solver="closed"|"riemannian"``).
* Backward (:class:`NearestETFFunction`): the O(d C^2) polar-factor formula of REFERENCE Sec. 4,

      What = A^T G_U B,  dL/dZ = A [(What - What^T)_ij/(s_i + s_j)] B^T + (I - A A^T) G_U B S^-1 B^T,
      dL/dHbar = dL/dZ Mt,   dL/dU_prox = (delta/2) dL/dZ,

  and, as a reference for small C, the paper's dense KKT (declarative node) formula
  :func:`kkt_backward_dense`. Autograd through ``torch.linalg.svd`` divides by s_i^2 - s_j^2 and
  breaks at collapse (repeated singular values); s_i + s_j stays positive.
* :func:`nearest_etf`, :func:`nearest_etf_distance`, :func:`etf_distance_between` -- Markou's
  "ETF distances" for the metrics (delta = 0: U* is then not unique, but U* Mt and the distance are).
* :func:`fused_step_host` -- the C x C part of the implicit ETF head's fused training step, on the host in
  float64 from the Gram of ``[H | U_prox]`` (the head's one host synchronisation per step); :func:`host_scalar`
  mirrors a 0-d buffer (the tracker's step, the head's ``initialised`` flag) on the host, so that reading it
  does not wait for the GPU.
* The heads built on the node live in :mod:`nc_lib.heads` (:class:`~nc_lib.heads.ImplicitETFHead`,
  :class:`~nc_lib.heads.CosineHead`); the sampler that puts every class in every batch, as the inner
  problem wants every class mean, in :mod:`nc_lib.data` (:class:`~nc_lib.data.StratifiedBatchSampler`).

Dimension. U (d x C) needs C orthonormal columns, so every function here raises a ValueError when
d < C (for d = C-1 a simplex ETF exists, but not in this parametrisation: use
:func:`nc_lib.etf.simplex_etf` or a larger feature dimension).

Precision and cost. The forward computes in float64 whatever the input dtype; the backward's
d x C products run in the output's dtype (its C x C algebra in float64 on NumPy). The closed form
uses by default the eigendecomposition of the C x C Gram Z^T Z (``U = Z B S^-1 B^T``) plus, where
eps cond(Z)^2 makes it matter for the output's dtype, one Newton-Schulz step: it matches LAPACK's
thin SVD to ~1e-14 in float64 at a fraction of its cost, and gives way to the SVD where
eps cond(Z)^2 > ``GRAM_MAX_ERR`` (``polar_method="svd"`` always selects the SVD). Forward +
backward cost three (five in float64 with the Newton-Schulz step) plus three d x C x C matrix
products, a dozen C x C operations and one C x C eigendecomposition. Small problems (d C^2 <=
``NUMPY_MAX_WORK``, CPU) run that algebra on NumPy (a microsecond or so per call against
torch's several: at C = 10 the cost is per-call overhead, not flops), larger ones on torch.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deprecation import moved_names
from .validation import check_choice, check_int, check_nonnegative, check_positive

SOLVERS = ("closed", "riemannian")
POLAR_METHODS = ("auto", "svd", "gram")
DEFAULT_DELTA = 1e-3
DEFAULT_TAU = 5.0
MIN_RATE = 1e-4


# --------------------------------------------------------------------------- small helpers
def check_dims(d: int, C: int, what: str = "the nearest simplex ETF") -> None:
    """ValueError unless C >= 2 and d >= C (U, d x C, needs C orthonormal columns); ``what`` names the caller."""
    if C < 2:
        raise ValueError(f"{what} needs num_classes C >= 2; got C={C}.")
    if d < C:
        raise ValueError(
            f"{what} is U Mt with U (d x C) of orthonormal columns, so it needs feature_dim d >= "
            f"num_classes C; got d={d}, C={C}. (For d = C-1 use nc_lib.etf.simplex_etf, or raise d.)"
        )


def _check_dC(name: str, X: Tensor) -> tuple[int, int]:
    if not isinstance(X, Tensor) or X.ndim != 2:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"{name} must be a 2-D (d x C) tensor; got {shape}.")
    d, C = X.shape
    check_dims(d, C)
    return d, C


def _nonfinite_message(name: str, X, where: str) -> str | None:
    """None when ``X`` holds no NaN or Inf; else a message naming ``name``, with its counts of NaN and Inf."""
    X = torch.as_tensor(X)
    if not X.is_floating_point() or bool(torch.isfinite(X).all()):
        return None
    nan, inf = int(torch.isnan(X).sum()), int(torch.isinf(X).sum())
    return (f"{name} contains NaN or Inf ({nan} NaN and {inf} Inf among its {X.numel()} entries): {where} needs "
            "finite input. NaN or Inf features usually mean that training diverged (lower the learning rate).")


def _check_finite(where: str, **tensors) -> None:
    """ValueError naming the first of ``tensors`` (keyword = the argument's name; None is skipped) that holds
    NaN or Inf, before the linear algebra fails on it with a LinAlgError or returns NaN. One
    ``torch.isfinite(X).all()`` per tensor (a host sync on a GPU); the node's hot path uses a cheaper check
    on a scalar it computes anyway and calls this only when that scalar is not finite."""
    for name, X in tensors.items():
        if X is not None:
            msg = _nonfinite_message(name, X, where)
            if msg is not None:
                raise ValueError(msg)


def host_scalar(module: nn.Module, name: str):
    """The value of ``module``'s 0-d buffer ``name`` as a Python number, read once and mirrored on the host.

    Reading a device tensor on the host waits for the GPU (a synchronisation); a step counter or a flag
    that only this module writes need not be read every step. The mirror is re-read when the buffer was
    replaced (``module.to(...)``, ``load_state_dict(assign=True)``) or written in place (``load_state_dict``,
    ``fill_``: its version counter moved) since it was taken; :func:`set_host_scalar` records a write."""
    t = getattr(module, name)
    seen = module.__dict__.get("_host_scalars", {}).get(name)
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter: read it every time
        return t.item()
    if seen is not None and seen[0] is t and seen[1] == version:
        return seen[2]
    value = t.item()
    module.__dict__.setdefault("_host_scalars", {})[name] = (t, version, value)
    return value


def set_host_scalar(module: nn.Module, name: str, value) -> None:
    """Record that ``module``'s buffer ``name`` now holds ``value`` (call right after writing it)."""
    t = getattr(module, name)
    try:
        module.__dict__.setdefault("_host_scalars", {})[name] = (t, t._version, value)
    except RuntimeError:  # pragma: no cover - inference tensors: nothing to mirror
        pass


def apply_mt(X: Tensor) -> Tensor:
    """``X Mt`` with ``Mt = (I - 11^T/C)/sqrt(C-1)`` (REFERENCE Sec. 1, 4), in O(dC).

    ``X (I - 11^T/C)`` subtracts from each row its mean over the C columns; Mt is symmetric, so
    this is also the adjoint (used by the backward: dL/dHbar = dL/dZ Mt)."""
    C = X.shape[-1]
    return (X - X.mean(dim=-1, keepdim=True)) / math.sqrt(C - 1)


def etf_gram_target(C: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The matrix ``Mt = (I - 11^T/C)/sqrt(C-1)`` (C x C)."""
    C = check_int("C", C, 2)
    return (torch.eye(C, dtype=dtype) - torch.full((C, C), 1.0 / C, dtype=dtype)) / math.sqrt(C - 1)


def etf_classifier(U: Tensor) -> Tensor:
    """Markou's classifier from the Stiefel point: ``W = (U sqrt(C/(C-1)) (I - 11^T/C))^T`` (C x d).

    Its rows are unit vectors with pairwise cosine -1/(C-1) (a simplex ETF) when U^T U = I."""
    C = U.shape[-1]
    return (math.sqrt(C / (C - 1)) * (U - U.mean(dim=-1, keepdim=True))).mT


def _procrustes_target(Hbar: Tensor, U_prox: Tensor | None, delta: float) -> Tensor:
    """``Z = Hbar Mt + (delta/2) U_prox`` (REFERENCE Sec. 4), in float64."""
    Z = apply_mt(Hbar.to(torch.float64))
    if U_prox is not None and delta > 0:
        Z = Z + (0.5 * delta) * U_prox.to(torch.float64)
    return Z


# --------------------------------------------------------------------------- closed form
NUMPY_MAX_WORK = 2**18
"""Problems with d C^2 at most this (on CPU, float32/float64) run the node's algebra on NumPy."""
NS_THRESHOLD = 1e-13
"""Newton-Schulz step after the Gram route when eps cond(Z)^2 exceeds this (float64 output)."""
NS_THRESHOLD_LOW = 1e-9
"""The same for lower-precision outputs (float32: the Gram route's error ~ eps64 cond^2 is then far
below the output's rounding, 6e-8, up to cond(Z) ~ 2000; beyond it the step is taken)."""
GRAM_MAX_ERR = 1e-6
"""The Gram route is taken while eps cond(Z)^2 <= this (cond(Z) <= ~6.7e4); beyond, the SVD
(measured against a 40-digit reference: Gram + Newton-Schulz matches the SVD's error up to here)."""
_EPS64 = 2.220446049250313e-16
_NUMPY_DTYPES = (torch.float32, torch.float64)
_LAPACK_SYEVD = None  # scipy.linalg.lapack.dsyev once looked up (False: unavailable)


def _np_eigh(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a symmetric float64 matrix (ascending eigenvalues).

    Calls LAPACK's dsyev through SciPy (a dependency of scikit-learn) directly: for C = 10 it
    costs ~10 us against ~16-25 us for ``numpy.linalg.eigh`` (argument checking and a ufunc
    wrapper); falls back on NumPy when SciPy is missing or LAPACK reports a failure."""
    global _LAPACK_SYEVD
    if _LAPACK_SYEVD is None:
        try:
            from scipy.linalg.lapack import dsyev
            _LAPACK_SYEVD = dsyev
        except Exception:  # pragma: no cover - SciPy comes with scikit-learn
            _LAPACK_SYEVD = False
    if _LAPACK_SYEVD:
        w, B, info = _LAPACK_SYEVD(G)
        if info == 0:
            return w, B
    return np.linalg.eigh(G)


def _use_numpy(t: Tensor) -> bool:
    """Run the node's algebra for ``t`` (d x C) on NumPy: CPU, float32/64 and d C^2 <= NUMPY_MAX_WORK.

    NumPy's per-call overhead is about a microsecond against torch's several: at C = 10 the node's
    cost is otherwise dominated by dispatch, not arithmetic. Below that size NumPy's BLAS stays
    single-threaded; larger problems run on torch (threaded products, any device)."""
    d, C = t.shape
    return t.is_cpu and t.dtype in _NUMPY_DTYPES and d * C * C <= NUMPY_MAX_WORK


def _gram_kernel(G, C: int):
    """C x C part of the Gram route to the polar factor of Z: ``G = Z^T Z = B S^2 B^T``,
    ``N = B S^-1 B^T`` (so that Z N is the polar factor in exact arithmetic). ``G``: a float64
    NumPy array or torch tensor. Returns ``(N, S, B, cond2, iS)`` with ``cond2 = cond(Z)^2`` and
    ``iS = 1/S``, or None
    when ``eps cond(Z)^2 > GRAM_MAX_ERR``: there the rounding of G (~ eps s_max^2) is no longer
    small against s_min^2, one Newton-Schulz step no longer brings U to the SVD's accuracy, and
    for a numerically rank-deficient Z (delta = 0) the sign of the smallest eigenvalue is noise:
    the caller then takes the SVD, which decides the rank."""
    if isinstance(G, np.ndarray):
        w, B = _np_eigh(G)
    else:
        w, B = torch.linalg.eigh(G)
    w0, w1 = float(w[0]), float(w[-1])
    if not (w0 > 0 and _EPS64 * w1 <= GRAM_MAX_ERR * w0) or C * _EPS64 * w1 >= w0:
        return None
    iS = w ** -0.5
    return (B * iS) @ B.T, w * iS, B, w1 / w0, iS


def _newton_schulz(U0):
    """One Newton-Schulz step towards orthonormal columns: ``U = U0 (3I - U0^T U0)/2``.

    After the Gram route, U0 = Z N has lost orthogonality in proportion to eps cond(Z)^2 (the
    rounding of Z^T Z); this step removes that error, which is most of it: in float64 the result
    agrees with the SVD's polar factor to ~1e-14."""
    M = U0.T @ U0
    M *= -0.5
    if isinstance(M, np.ndarray):
        M.flat[:: M.shape[0] + 1] += 1.5
    else:
        M.diagonal().add_(1.5)
    return U0 @ M


def _polar_gram(Z: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Polar factor by the Gram route (see :func:`_gram_kernel`, :func:`_newton_schulz`): ``(U, S, B)`` or None."""
    out = _gram_kernel(Z.mT @ Z, Z.shape[1])
    if out is None:
        return None
    N, S, B, _, _ = out
    return _newton_schulz(Z @ N), S, B


def polar_factor(Z: Tensor, method: str = "gram") -> tuple[Tensor, Tensor, Tensor]:
    """Polar factor of ``Z`` (d x C, d >= C): ``U = A B^T`` for ``Z = A S B^T``.

    Returns ``(U, S, B)`` (S: the C singular values, B: C x C right singular vectors), all
    that the backward needs (``A = U B``). ``U`` maximises <Z, U> over U^T U = I (orthogonal
    Procrustes), i.e. solves the node's inner problem in closed form (REFERENCE Sec. 4).

    method ``"svd"``: LAPACK thin SVD. ``"gram"``: eigendecomposition of the C x C Gram
    ``Z^T Z = B S^2 B^T``, ``U = Z B S^-1 B^T`` and one Newton-Schulz step: four d x C x C products
    and a C x C eigendecomposition, cheaper than the SVD (use it in float64: it squares the
    condition number). Where the Gram route cannot reach the SVD's accuracy (eps cond(Z)^2 >
    ``GRAM_MAX_ERR``), in particular when Z is rank deficient (e.g. delta = 0), ``"gram"`` falls
    back to the SVD, whose U is then one of the minimisers (any completion of the null directions)."""
    check_choice("method", method, ("svd", "gram"))
    d, C = Z.shape
    check_dims(d, C)
    _check_finite("polar_factor", Z=Z)
    return _polar(Z, method)


def _polar(Z: Tensor, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`polar_factor` without its checks (for callers that checked Z already)."""
    if method == "gram":
        out = _polar_gram(Z.to(torch.float64))
        if out is not None:
            return tuple(x.to(Z.dtype) for x in out)
    A, S, Bh = torch.linalg.svd(Z, full_matrices=False)
    return A @ Bh, S, Bh.mT


def _auto_polar_method(dtype: torch.dtype, method: str) -> str:
    method = check_choice("polar_method", method, POLAR_METHODS)
    return "gram" if method == "auto" else method


@functools.lru_cache(maxsize=32)
def _centering_numpy(C: int, scale: float = 1.0) -> np.ndarray:
    """(I - 11^T/C)/scale, float64 (read-only: shared between calls)."""
    A = (np.eye(C) - np.full((C, C), 1.0 / C)) / scale
    A.flags.writeable = False
    return A


# --------------------------------------------------------------------------- Riemannian solver
def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.mT)


def _qf(X: Tensor) -> Tensor:
    """Q factor of the thin QR with a positive diagonal of R: the QR retraction's map onto Stiefel."""
    Q, R = torch.linalg.qr(X)
    s = torch.sign(torch.diagonal(R))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s


def riemannian_polar(Z: Tensor, U0: Tensor | None = None, *, max_iter: int = 30, tol: float | None = None,
                     max_inner: int | None = None) -> tuple[Tensor, int]:
    """Maximise <Z, U> over the Stiefel manifold by the Riemannian trust-region method.

    This is the paper's solver (Markou Sec. 3.3 uses pymanopt's ``TrustRegions``: Absil, Baker &
    Gallivan 2007, truncated-CG (Steihaug-Toint) inner solver, QR retraction, warm start, at most 30
    iterations), specialised to the node's cost f(U) = -<Z, U> (the inner problem up to constants
    and a factor 2). On St(d, C) with the embedded metric:

        grad f(U)   = -Z + U sym(U^T Z),
        Hess f(U)[xi] = Proj_U(xi sym(U^T Z)),   Proj_U(V) = V - U sym(U^T V),
        R_U(xi)     = qf(U + xi).

    ``U0``: the warm start (the previous solution, U_prox); default ``qf(Z)``. Stops when
    ||grad f|| <= tol ||Z||_F (tol default: 1e-12 in float64, 1e-6 in float32) or after
    ``max_iter`` outer iterations. Returns ``(U, iterations)``, in Z's dtype.
    """
    d, C = Z.shape
    check_dims(d, C)
    _check_finite("riemannian_polar", Z=Z, U0=U0)
    max_iter = check_int("max_iter", max_iter, 0)
    if tol is None:
        tol = 1e-12 if Z.dtype == torch.float64 else 1e-6
    tol = check_nonnegative("tol", tol)
    dim = d * C - C * (C + 1) // 2
    max_inner = dim if max_inner is None else check_int("max_inner", max_inner, 1)
    U = _qf(Z) if U0 is None else _qf(U0.to(Z.dtype))  # re-orthonormalise the warm start

    def proj(X: Tensor, V: Tensor) -> Tensor:
        return V - X @ _sym(X.mT @ V)

    def cost(X: Tensor) -> float:
        return -float((Z * X).sum())

    z_norm = float(Z.norm())
    gtol = tol * max(z_norm, torch.finfo(Z.dtype).tiny)
    delta_bar = math.sqrt(C)  # pymanopt: Stiefel.typical_dist
    radius = delta_bar / 8.0
    rho_prime, rho_reg = 0.1, 1e3
    eps = torch.finfo(Z.dtype).eps
    fx = cost(U)
    P = _sym(U.mT @ Z)
    grad = -Z + U @ P
    it = 0
    while it < max_iter:
        gnorm = float(grad.norm())
        if gnorm <= gtol:
            break
        it += 1

        def hess(xi: Tensor) -> Tensor:
            return proj(U, xi @ P)

        # truncated CG (Steihaug-Toint) on m(eta) = <grad, eta> + 1/2 <Hess eta, eta>, ||eta|| <= radius
        eta = torch.zeros_like(U)
        Heta = torch.zeros_like(U)
        r = grad
        r_r = float((r * r).sum())
        norm_r0 = math.sqrt(r_r)
        delta_dir = -r
        e_Pe, e_Pd, d_Pd = 0.0, 0.0, r_r
        model_value = 0.0
        hit_boundary = False
        for _ in range(max_inner):
            Hd = hess(delta_dir)
            d_Hd = float((delta_dir * Hd).sum())
            alpha = r_r / d_Hd if d_Hd != 0 else math.inf
            e_Pe_new = e_Pe + 2.0 * alpha * e_Pd + alpha * alpha * d_Pd
            if d_Hd <= 0 or e_Pe_new >= radius * radius:
                tau = (-e_Pd + math.sqrt(max(e_Pd * e_Pd + d_Pd * (radius * radius - e_Pe), 0.0))) / d_Pd
                eta = eta + tau * delta_dir
                Heta = Heta + tau * Hd
                hit_boundary = True
                break
            e_Pe = e_Pe_new
            new_eta = eta + alpha * delta_dir
            new_Heta = Heta + alpha * Hd
            new_model = float((new_eta * grad).sum()) + 0.5 * float((new_eta * new_Heta).sum())
            if new_model >= model_value:
                break
            eta, Heta, model_value = new_eta, new_Heta, new_model
            r = r + alpha * Hd
            r_r_new = float((r * r).sum())
            if math.sqrt(r_r_new) <= norm_r0 * min(norm_r0, 0.1):  # theta = 1, kappa = 0.1 (pymanopt)
                break
            beta = r_r_new / r_r
            r_r = r_r_new
            delta_dir = proj(U, -r + beta * delta_dir)
            e_Pd = beta * (e_Pd + alpha * d_Pd)
            d_Pd = r_r + beta * beta * d_Pd

        U_new = _qf(U + eta)
        f_new = cost(U_new)
        reg = max(1.0, abs(fx)) * eps * rho_reg
        rho_num = fx - f_new + reg
        rho_den = -float((grad * eta).sum()) - 0.5 * float((eta * Heta).sum()) + reg
        rho = rho_num / rho_den if rho_den > 0 else -math.inf
        if rho < 0.25:
            radius /= 4.0
        elif rho > 0.75 and hit_boundary:
            radius = min(2.0 * radius, delta_bar)
        if rho > rho_prime:
            U, fx = U_new, f_new
            P = _sym(U.mT @ Z)
            grad = -Z + U @ P
    return U, it


# --------------------------------------------------------------------------- solve + node
def nearest_etf_solve(Hbar: Tensor, U_prox: Tensor | None = None, delta: float = DEFAULT_DELTA, *,
                      solver: str = "closed", U_init: Tensor | None = None, max_iter: int = 30,
                      tol: float | None = None, polar_method: str = "auto") -> tuple[Tensor, int]:
    """Solve the inner problem without gradient: ``U* = argmin ||Hbar - U Mt||^2 + (delta/2)||U - U_prox||^2``.

    ``U_prox=None`` (or ``delta=0``) drops the proximal term (the paper's first solve; the metrics'
    ETF distances). Returns ``(U*, iterations)`` in Hbar's dtype; ``iterations`` is 0 for the
    closed form. ``U_init`` is the Riemannian warm start (default U_prox, else qf(Z))."""
    d, C = _check_dC("Hbar", Hbar)
    check_choice("solver", solver, SOLVERS)
    delta = check_nonnegative("delta", delta)
    if U_prox is not None and tuple(U_prox.shape) != (d, C):
        raise ValueError(f"U_prox must have Hbar's shape {(d, C)}; got {tuple(U_prox.shape)}.")
    with torch.no_grad():
        Z = _procrustes_target(Hbar, U_prox, delta)
        # Z is finite exactly when Hbar and (delta > 0) U_prox are: one scalar tells (a host sync on a GPU)
        if not math.isfinite(float(Z.sum())):
            _check_finite("the nearest-ETF node", Hbar=Hbar, U_prox=U_prox if delta > 0 else None)
            if not bool(torch.isfinite(Z).all()):
                raise ValueError(f"Z = Hbar Mt + (delta/2) U_prox overflows (delta={delta}): scale Hbar to unit norm.")
        if solver == "closed":
            U, _, _ = _polar(Z, _auto_polar_method(Hbar.dtype, polar_method))
            return U.to(Hbar.dtype), 0
        _check_finite("the nearest-ETF node", U_init=U_init)
        start = U_init if U_init is not None else U_prox
        U, it = riemannian_polar(Z, None if start is None else start.to(torch.float64), max_iter=max_iter, tol=tol)
        return U.to(Hbar.dtype), it


def polar_backward(U: Tensor, S: Tensor, B: Tensor, grad_U: Tensor) -> Tensor:
    """dL/dZ for ``U = polar(Z)``, ``Z = A S B^T``, ``A = U B`` (REFERENCE Sec. 4), in O(d C^2):

        What = A^T G B = B^T (U^T G) B,
        dL/dZ = A [(What - What^T)_ij/(s_i + s_j)] B^T + (I - A A^T) G B S^-1 B^T
              = U (B X B^T - T N) + G N,   T = U^T G, N = B S^-1 B^T, X_ij = (What - What^T)_ij/(s_i + s_j).

    Three d x C x C products; the C x C algebra is done in float64. Needs every s_i > 0 (delta > 0)."""
    C = S.shape[0]
    s = S.to(torch.float64)
    if not bool(s.min() > C * torch.finfo(torch.float64).eps * s.max()):
        raise ValueError(
            "The nearest-ETF node has no derivative when Z = Hbar Mt + (delta/2) U_prox is rank "
            "deficient (delta = 0 or no proximal term): use delta > 0 with U_prox (REFERENCE Sec. 4)."
        )
    B64 = B.to(torch.float64)
    T = (U.mT @ grad_U).to(torch.float64)
    What = B64.mT @ T @ B64
    X = (What - What.mT) / (s[:, None] + s[None, :])
    N = (B64 / s) @ B64.mT
    M1 = B64 @ X @ B64.mT - T @ N
    dt = grad_U.dtype
    return U.to(dt) @ M1.to(dt) + grad_U @ N.to(dt)


def _centre_rows(X: Tensor, c: float) -> Tensor:
    """``X (I - 11^T/C)/c`` in O(C^2): each row minus its mean, divided by c."""
    return (X - X.mean(dim=1, keepdim=True)) / c


def _numpy64(t: Tensor) -> np.ndarray:
    """``t`` as a float64 NumPy array (no copy when it already is one)."""
    a = t.numpy(force=True)
    return a if a.dtype == np.float64 else a.astype(np.float64)


_NO_GRADS = (None,) * 9
_INPLACE_MESSAGE = ("The output U of the nearest-ETF node was modified by an in-place operation after "
                    "the forward; its backward needs it unchanged (clone it before modifying it).")
_RANK_MESSAGE = ("The nearest-ETF node has no derivative when Z = Hbar Mt + (delta/2) U_prox is rank "
                 "deficient (delta = 0 or no proximal term): use delta > 0 with U_prox (REFERENCE Sec. 4).")


def _node_backward(ctx, grad_U: Tensor):
    """The backward of :class:`NearestETFFunction` (see its docstring for the formula)."""
    need_h, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_U is None or not (need_h or need_p):
        return _NO_GRADS
    if not ctx.full_rank:
        raise ValueError(_RANK_MESSAGE)
    B, Bt = ctx.B, ctx.Bt
    on_np = ctx.numpy
    if on_np:  # products in the output's dtype (U, G, NC), C x C algebra in float64
        U = ctx.U  # shares the output's memory: check that it was not modified in place
        out = ctx.out_ref()
        if out is not None and out._version != ctx.out_version:
            raise RuntimeError(_INPLACE_MESSAGE)
        G = grad_U.numpy(force=True)
        if G.dtype != U.dtype:
            G = G.astype(U.dtype)
    else:
        U = ctx.saved_tensors[0]  # the output (unpacking checks that it was not modified in place)
        G = grad_U.detach().to(U.dtype)
    W = Bt @ (U.T @ G) @ B  # What = A^T G B = B^T (U^T G) B
    Y = W * ctx.P1
    Y -= W.T * ctx.P2  # [(What - What^T)_ij/(s_i + s_j)] - What S^-1
    BY = B @ Y
    gH = gP = None
    if need_h:
        M = BY @ ctx.BtC
        gH = G @ ctx.NC
        gH += U @ (M if M.dtype == U.dtype else M.astype(U.dtype))
    if need_p:
        M = BY @ Bt
        gP = G @ ctx.N
        gP += U @ (M if M.dtype == U.dtype else M.astype(U.dtype))
        if ctx.scale_p != 1.0:
            gP *= ctx.scale_p
    if on_np:
        gH = None if gH is None else torch.from_numpy(gH)
        gP = None if gP is None else torch.from_numpy(gP)
    return gH, gP, None, None, None, None, None, None, None


_node_backward_once = torch.autograd.function.once_differentiable(_node_backward)


class NearestETFFunction(torch.autograd.Function):
    """Autograd node ``(Hbar, U_prox) -> U*`` (forward: closed form or Riemannian; backward: the
    polar-factor formula of :func:`polar_backward`, dL/dHbar = dL/dZ Mt, dL/dU_prox = (delta/2) dL/dZ).

    Use through :func:`nearest_etf_node`. Outputs U; the iteration count goes into the ``info``
    dict. Small problems (:func:`_use_numpy`) run on NumPy, larger ones on torch.

    Forward, in float64 whatever the input dtype. It works on a positive multiple of Z, which
    has the same polar factor, ``Zc = Z sqrt(C-1)/c = Hbar Cc + U_prox`` with ``c = (delta/2)
    sqrt(C-1)`` and ``Cc = (I - 11^T/C)/c`` (on NumPy one d x C x C product, cheaper than three
    calls at C = 10; on torch row means, O(dC); without proximal term c = 1). Closed form: ``Zc^T Zc = B S^2 B^T`` (one C x C eigendecomposition),
    ``U = Zc N``, ``N = B S^-1 B^T``, then a Newton-Schulz step where eps cond(Z)^2 exceeds
    ``NS_THRESHOLD`` (float64 output; ``NS_THRESHOLD_LOW`` for float32, whose rounding hides the
    Gram route's error); beyond ``GRAM_MAX_ERR``, the SVD. S, B, N are those of Zc throughout.

    Backward (A = U B, T = U^T G, What = B^T T B = A^T G B, P2_ij = 1/(s_i + s_j), P1 = P2 - 1/s_j):

        Y = What o P1 - What^T o P2 = [(What - What^T)_ij/(s_i + s_j)] - What S^-1,
        dL/dZ = (sqrt(C-1)/c) (U (B Y B^T) + G N),
        dL/dHbar = dL/dZ Mt = G (N Cc) + U (B Y (B^T Cc)),   dL/dU_prox = (delta/2) dL/dZ = U (B Y B^T) + G N:

    three d x C x C products (U^T G, G (N Cc), U (...)). Only what it needs is kept: the output U
    itself (no copy; an in-place change of it before the backward raises, as for torch's own
    functions), B, B^T, P1, P2, N Cc and B^T Cc (N for U_prox). On NumPy the d x C products run in
    the output's dtype (float32 gradients for float32 inputs, as on torch; the C x C algebra in
    float64); on torch everything runs in the output's dtype.

    Cost at C = 10 on NumPy (one to a few microseconds a call): forward three d x C x C products
    (float64 output: five, with the Newton-Schulz step), one 10 x 10 eigendecomposition (LAPACK
    dsyev), a dozen C x C operations; backward three products, an addition and eight C x C
    operations. The rest of the time is torch's: ``Function.apply`` and the autograd engine's
    ``backward`` cost about as much as one thin SVD of the d x C matrix at this size.
    """

    @staticmethod
    def forward(ctx, Hbar: Tensor, U_prox: Tensor, delta: float, solver: str, U_init: Tensor | None,
                max_iter: int, tol: float | None, polar_method: str, info: dict) -> Tensor:
        dt = Hbar.dtype
        C = Hbar.shape[1]
        r = math.sqrt(C - 1)
        c = 0.5 * delta * r
        c = c if 1e-150 < c < 1e150 else 1.0  # Zc = Z sqrt(C-1)/c; c = 1 without proximal term
        wp = 0.5 * delta * r / c  # weight of U_prox in Zc (1 unless c is out of range)
        on_np = _use_numpy(Hbar)
        if on_np:
            Cc = _centering_numpy(C, c)
            Zc = Hbar.numpy(force=True) @ Cc  # float64 (Cc is)
            if delta > 0:
                P = U_prox.numpy(force=True) if U_prox.dtype in _NUMPY_DTYPES else _numpy64(U_prox.double())
                Zc += P if wp == 1.0 else np.multiply(P, wp, dtype=np.float64)
        else:  # O(dC): X (I - 11^T/C) subtracts from each row its mean
            Cc = None
            H64 = Hbar.detach().to(torch.float64)
            Zc = (H64 - H64.mean(dim=1, keepdim=True)).mul_(1.0 / c)
            if delta > 0:
                Zc.add_(U_prox.detach().to(torch.float64), alpha=wp)
        it = 0
        N = None
        U = None
        # NaN or Inf in Hbar or U_prox: a clear error here, not a LinAlgError (or NaN) from the solver. Zc is finite
        # exactly when they are; its Gram's trace ||Zc||_F^2 (computed anyway) or its sum is one scalar to check
        # (a host sync on a GPU, where the Gram route syncs already); the full check runs only when it is not finite
        gram = polar_method != "svd" and solver == "closed"
        G = Zc.T @ Zc if gram else None
        if not math.isfinite(float(G.trace() if gram else Zc.sum())):
            _check_finite("the nearest-ETF node", Hbar=Hbar, U_prox=U_prox if delta > 0 else None)
            if solver == "closed":  # finite but overflowing: the SVD copes
                G, gram = None, False
        if solver == "riemannian":
            _check_finite("the nearest-ETF node", U_init=U_init)
        if solver == "closed":
            out = _gram_kernel(G, C) if gram else None
            if out is not None:
                N, S, B, cond2, iS = out
                full_rank = True  # the Gram route resolved s_min
                # Newton-Schulz only where it matters: the Gram route's error is ~ eps cond(Z)^2
                U = Zc @ N
                if cond2 * _EPS64 > (NS_THRESHOLD if dt == torch.float64 else NS_THRESHOLD_LOW):
                    U = _newton_schulz(U)
            else:
                A, S, Bh = torch.linalg.svd(torch.as_tensor(Zc, device=Hbar.device), full_matrices=False)
                U, B = A @ Bh, Bh.mT
        else:
            Z64 = torch.as_tensor(Zc, device=Hbar.device)
            start = U_init if U_init is not None else U_prox
            U, it = riemannian_polar(Z64 * (c / r), start.to(torch.float64), max_iter=max_iter, tol=tol)
            # at the optimum U^T Zc = B S B^T is symmetric positive definite: S, B without an SVD
            S, B = torch.linalg.eigh(_sym(U.mT @ Z64))
        if N is None:
            if on_np:
                U, S, B = _numpy64(U), _numpy64(S), _numpy64(B)
            full_rank = float(S.min()) > C * _EPS64 * float(abs(S).max())
        if on_np:
            out = torch.from_numpy(U if dt == torch.float64 else U.astype(np.float32))
        else:
            out = U.to(dt)  # a new tensor: U is not kept elsewhere
        ctx.full_rank, ctx.numpy = full_rank, on_np
        info["iterations"] = it
        need_h, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if full_rank and (need_h or need_p):
            if on_np:  # the backward reads the output's memory: keep it, and its version to check
                ctx.U, ctx.out_ref, ctx.out_version = out.numpy(), weakref.ref(out), out._version
            else:
                ctx.save_for_backward(out)
            ctx.scale_p = 0.5 * delta * r / c  # dL/dU_prox = scale_p (U (B Y B^T) + G N)
            if N is None:
                iS = 1.0 / S
                N = (B * iS) @ B.T
            P2 = np.reciprocal(np.add.outer(S, S)) if on_np else 1.0 / (S[:, None] + S[None, :])  # symmetric
            ctx.B, ctx.Bt, ctx.P2, ctx.P1 = B, B.T, P2, P2 - iS
            if need_h:  # N Cc and B^T Cc: one C x C product each on NumPy, O(C^2) on torch
                ctx.NC, ctx.BtC = (N @ Cc, B.T @ Cc) if on_np else (_centre_rows(N, c), _centre_rows(B.T, c))
            if need_p:
                ctx.N = N
            if on_np:  # products of the backward in the output's dtype
                if dt == torch.float32:
                    if need_h:
                        ctx.NC = ctx.NC.astype(np.float32)
                    if need_p:
                        ctx.N = N.astype(np.float32)
            else:
                for k in ("B", "Bt", "P1", "P2", "NC", "BtC", "N"):
                    if hasattr(ctx, k):
                        setattr(ctx, k, getattr(ctx, k).to(dt))
        return out

    @staticmethod
    def backward(ctx, grad_U: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: this backward is not itself differentiable
            return _node_backward_once(ctx, grad_U)
        return _node_backward(ctx, grad_U)


def nearest_etf_node(Hbar: Tensor, U_prox: Tensor, delta: float = DEFAULT_DELTA, *, solver: str = "closed",
                     U_init: Tensor | None = None, max_iter: int = 30, tol: float | None = None,
                     polar_method: str = "auto") -> tuple[Tensor, int]:
    """Differentiable nearest-ETF node (Markou Sec. 3.3; REFERENCE Sec. 4).

    U* = argmin_{U^T U = I} ||Hbar - U Mt||_F^2 + (delta/2)||U - U_prox||_F^2 = polar(Hbar Mt + (delta/2) U_prox).

    Hbar, U_prox: (d x C), d >= C. solver: ``"closed"`` (polar factor) or ``"riemannian"``
    (trust region warm-started at ``U_init``, default U_prox; at most ``max_iter`` iterations).
    Gradients flow to Hbar and U_prox by the O(dC^2) formula of :func:`polar_backward`; they need
    delta > 0. Returns ``(U*, iterations)`` (iterations 0 for the closed form)."""
    _check_dC("Hbar", Hbar)
    if not isinstance(U_prox, Tensor) or U_prox.shape != Hbar.shape:
        raise ValueError(f"U_prox must be a tensor of Hbar's shape {tuple(Hbar.shape)}; got "
                         f"{tuple(U_prox.shape) if isinstance(U_prox, Tensor) else U_prox!r}.")
    if solver not in SOLVERS:
        check_choice("solver", solver, SOLVERS)
    if polar_method not in POLAR_METHODS:
        check_choice("polar_method", polar_method, POLAR_METHODS)
    delta = check_nonnegative("delta", delta)
    if type(max_iter) is not int or max_iter < 0:
        max_iter = check_int("max_iter", max_iter, 0)
    info: dict = {}
    U = NearestETFFunction.apply(Hbar, U_prox, delta, solver, U_init, max_iter, tol, polar_method, info)
    return U, info["iterations"]


# --------------------------------------------------------------------------- the implicit head's fused step, host part
class FusedHostSolve(NamedTuple):
    """What :func:`fused_step_host` hands back to the device (host arrays or CPU tensors, see there)."""

    R: np.ndarray | Tensor
    after: np.ndarray | Tensor | None
    consts: np.ndarray | Tensor | None
    inv_norm2: float


FUSED_NUMPY_MAX_C = 32
""":func:`fused_step_host` runs on NumPy up to this C (a microsecond per call), on torch's CPU above it (its
BLAS and LAPACK follow ``torch.set_num_threads``; NumPy's OpenBLAS threads fight over a busy machine's cores)."""
HOST_SOLVE_RANGE = "nc_lib.fused_step_host"
"""The profiler range around the host solve on torch (its tensors are on the host: no device synchronisation)."""


def fused_step_host(K: np.ndarray, C: int, delta: float, dtype: torch.dtype, grad: bool) -> FusedHostSolve | None:
    """The C x C part of one fused training step of the implicit ETF head (:class:`nc_lib.heads.ImplicitETFHead`),
    on the host in float64: everything the node needs from its d x C inputs is their Gram.

    ``K = V^T V`` (2C x 2C, float64) is the Gram of ``V = [H | U_prox]`` (d x C each; H the tracker's running
    class means, not yet normalised). With ``n = ||H||_F = sqrt(tr K11)``, ``A1 = Cc/n`` and the node's
    ``Zc = H A1 + wp U_prox`` (:class:`NearestETFFunction`: ``Cc = (I - 11^T/C)/c``, c and wp as there),

        G = Zc^T Zc = A1 K11 A1 + wp (A1 K12 + K21 A1) + wp^2 K22 = B S^2 B^T,   N = B S^-1 B^T,
        U = Zc N = V [A1 N; wp N],

    so that the device needs one product of V with a 2C x 3C matrix for ``[U | W^T | A]`` (``W^T = U Pc``, the
    classifier of :func:`etf_classifier`, ``Pc = sqrt(C/(C-1)) (I - 11^T/C)``; ``A = U B``, the left singular
    vectors, for the backward). Returns a :class:`FusedHostSolve`: ``R`` (float64; ``V @ R = [U | W^T | A]``,
    without A when ``grad`` is False), or, where a Newton-Schulz step is due (eps cond(Z)^2 above
    ``NS_THRESHOLD`` for float64 output, ``NS_THRESHOLD_LOW`` otherwise, as the node), ``R = [A1 N; wp N]`` and
    ``after`` (``U [I | Pc | B]``, applied to U after the step); ``consts`` (``grad``: 5 x C x C in ``dtype``, the
    node backward's B, P1, P2, N Cc/n and B^T Cc/n; see :class:`NearestETFFunction`, whose N Cc and B^T Cc are
    here divided by n to carry the gradient from Hbar = H/n to H); ``inv_norm2 = 1/n^2``. NumPy arrays up to
    ``C = FUSED_NUMPY_MAX_C``, CPU tensors above.

    None where this route does not apply: K not finite, H = 0, or the Gram route cannot reach the SVD's accuracy
    (:func:`_gram_kernel`). The caller then runs the general route, which raises the right error or takes the SVD.
    """
    if C <= FUSED_NUMPY_MAX_C:
        return _fused_step_host(K, C, delta, dtype, grad, np)
    from torch.profiler import record_function

    with record_function(HOST_SOLVE_RANGE):
        return _fused_step_host(torch.from_numpy(K), C, delta, dtype, grad, torch)


def _fused_step_host(K, C: int, delta: float, dtype: torch.dtype, grad: bool, xp) -> FusedHostSolve | None:
    """:func:`fused_step_host` on ``xp`` (``numpy`` for NumPy arrays, ``torch`` for CPU tensors)."""
    on_np = xp is np
    n2 = float(K[:C, :C].trace())
    if not (0.0 < n2 < math.inf and math.isfinite(float(K.sum()))):  # the sum: NaN or Inf anywhere in K
        return None
    r = math.sqrt(C - 1)
    c = 0.5 * delta * r
    c = c if 1e-150 < c < 1e150 else 1.0
    wp = 0.5 * delta * r / c
    n = math.sqrt(n2)
    if on_np:  # small C: few calls (each costs a microsecond, its arithmetic nothing); Zc = V M, M = [A1; wp I]
        M = _fused_left(C, c, wp).copy()
        M[:C] /= n
        A1 = M[:C]
        G = M.T @ K @ M
    else:  # large C: A1 = (I - 11^T/C)/(c n) as centrings of columns (rows), O(C^2) instead of products, C^3
        def left(X):
            return (X - X.sum(0)[None, :] / C) / (c * n)

        T = left(K[:C, C:])
        G = left(left(K[:C, :C]).T) + wp * (T + T.T) + (wp * wp) * K[C:, C:]  # K11 and G are symmetric
    out = _gram_kernel(G, C)
    if out is None:
        return None
    N, S, B, cond2, iS = out
    Pc, eye = _centering_numpy(C, math.sqrt((C - 1) / C)), _eye(C)
    if on_np:
        Mf, AN, BA = M @ N, N @ A1, B.T @ A1
        after = np.concatenate([eye, Pc, B] if grad else [eye, Pc], 1)
    else:
        Mf, AN, BA = torch.cat([left(N), wp * N]), left(N).T, left(B).T  # N @ A1 = (A1 N)^T: N, A1 symmetric
        after = torch.cat([torch.from_numpy(x.copy()) for x in (eye, Pc)] + ([B] if grad else []), 1)
    ns = cond2 * _EPS64 > (NS_THRESHOLD if dtype == torch.float64 else NS_THRESHOLD_LOW)
    R, after = (Mf, after) if ns else (Mf @ after, None)
    consts = None
    if grad:  # B, P1 = P2 - 1/s_j, P2 = 1/(s_i + s_j), N Cc/n, B^T Cc/n
        P2 = 1.0 / (S[:, None] + S[None, :])
        if on_np:
            consts = np.empty((5, C, C), np.float64 if dtype == torch.float64 else np.float32)
            consts[0], consts[1], consts[2], consts[3], consts[4] = B, P2 - iS, P2, AN, BA
        else:
            consts = torch.stack([B, P2 - iS, P2, AN, BA]).to(dtype)
    return FusedHostSolve(R, after, consts, 1.0 / n2)


@functools.lru_cache(maxsize=32)
def _fused_left(C: int, c: float, wp: float) -> np.ndarray:
    """``[(I - 11^T/C)/c; wp I]`` (2C x C, float64, read-only): Zc = [H | U_prox] this, with its top block / ||H||."""
    M = np.concatenate([_centering_numpy(C, c), wp * np.eye(C)])
    M.flags.writeable = False
    return M


@functools.lru_cache(maxsize=32)
def _eye(C: int) -> np.ndarray:
    E = np.eye(C)
    E.flags.writeable = False
    return E


# --------------------------------------------------------------------------- dense KKT reference
def kkt_memory_bytes(C: int, d: int, dtype: torch.dtype = torch.float64) -> int:
    """Bytes :func:`kkt_backward_dense` allocates: the dense constraint Jacobian A
    (C(C+1)/2 x dC), one d-chunk of A H^-1, and the C(C+1)/2-square Schur complement."""
    p = C * (C + 1) // 2
    item = torch.finfo(dtype).bits // 8
    chunk = min(d, 64)
    return item * (p * d * C + p * chunk * C + p * p + 4 * d * C)


def kkt_backward_dense(Hbar: Tensor, U_prox: Tensor, U: Tensor, grad_U: Tensor, delta: float = DEFAULT_DELTA,
                       max_bytes: float = 8 * 2**30) -> tuple[Tensor, Tensor]:
    """The paper's backward: implicit differentiation of the KKT conditions (declarative node;
    Gould et al. 2021 Prop. 4.5, as Markou's ``ClosestETFGeometryFcn.backward``), built densely.

    y = vec(U) (row-major, dC), x = (Hbar, U_prox), f = ||Hbar - U Mt||^2 + (delta/2)||U - U_prox||^2,
    h(U) = vech(U^T U - I) (p = C(C+1)/2 constraints). With G = grad_U f at U*,
    Lambda = sym(U^T G), the Lagrangian Hessian is H = I_d (x) K, K = 2 Mt^2 + delta I - Lambda
    (acting as xi -> xi K), A = Dh (p x dC, **dense**), B = D^2_{xy} f (dG/dHbar = -2 E Mt,
    dG/dU_prox = -delta E). For v = dL/dU:

        q = (A H^-1 A^T)^-1 A H^-1 v,   r = H^-1 (A^T q - v),
        dL/dHbar = -2 r Mt,   dL/dU_prox = -delta r.

    O(C^4 d) time and O(C^3 d) memory: a reference for small C only; refuses (ValueError) when
    :func:`kkt_memory_bytes` exceeds ``max_bytes``. Computed in U's dtype."""
    d, C = _check_dC("U", U)
    need = kkt_memory_bytes(C, d, U.dtype)
    if need > max_bytes:
        raise ValueError(f"kkt_backward_dense would need about {need / 2**30:.1f} GiB for C={C}, d={d} "
                         f"(max_bytes={max_bytes / 2**30:.1f} GiB); use polar_backward.")
    dt = U.dtype
    Hbar, U_prox, v = Hbar.to(dt), U_prox.to(dt), grad_U.to(dt)
    Mt = etf_gram_target(C, dt)
    G = 2.0 * (U @ Mt - Hbar) @ Mt + delta * (U - U_prox)
    Lam = _sym(U.mT @ G)
    K = 2.0 * Mt @ Mt + delta * torch.eye(C, dtype=dt) - Lam
    Kinv = torch.linalg.inv(K)
    # dense constraint Jacobian: row (i <= j) is d(u_i . u_j) = u_i (x) e_j + u_j (x) e_i, as (C x d) blocks
    iu, ju = torch.triu_indices(C, C)
    p = iu.numel()
    rows = torch.arange(p)
    A = torch.zeros(p, C, d, dtype=dt)  # A[r, k, a] = dh_r / dU[a, k]
    A[rows, ju] += U[:, iu].mT
    A[rows, iu] += U[:, ju].mT
    # Schur complement S = A H^-1 A^T, H^-1 = I_d (x) K^-1, accumulated over chunks of d
    Schur = torch.zeros(p, p, dtype=dt)
    chunk = 64
    for a0 in range(0, d, chunk):
        Ab = A[:, :, a0:a0 + chunk]  # p x C x c
        AHb = torch.einsum("rka,kl->rla", Ab, Kinv)  # (A H^-1) restricted to the chunk
        Schur += AHb.reshape(p, -1) @ Ab.reshape(p, -1).mT
    A_flat = A.reshape(p, C * d)
    Hinv_v = (v @ Kinv).mT.reshape(C * d)  # H^-1 v, in A's (C x d) layout
    q = torch.linalg.solve(Schur, A_flat @ Hinv_v)
    At_q = (q @ A_flat).reshape(C, d).mT  # A^T q as d x C
    r = (At_q - v) @ Kinv
    return -2.0 * r @ Mt, -delta * r


# --------------------------------------------------------------------------- ETF distances
def _rows_to_hbar(V: Tensor, name: str) -> Tensor:
    V = torch.as_tensor(V)
    if V.ndim != 2:
        raise ValueError(f"{name} must be a (C x d) matrix; got shape {tuple(V.shape)}.")
    C, d = V.shape
    check_dims(d, C, "the nearest simplex ETF of a (C x d) matrix")
    H = V.detach().to(torch.float64).mT
    n = float(H.norm())
    if not 0 < n < math.inf:  # NaN or Inf in V, V = 0, or a norm that under- or overflows
        _check_finite("the nearest simplex ETF (and the ETF distances)", **{name: V})
        m = float(H.abs().max())
        if m == 0:
            raise ValueError(f"{name} is zero: it has no nearest ETF.")
        H = H / m  # entries so small (or large) that their squares under- (or over-)flow
        n = float(H.norm())
    return H / n


def nearest_etf(V: Tensor) -> Tensor:
    """The simplex ETF nearest to the rows of ``V`` (C x d), as rows (C x d) of unit Frobenius norm.

    Markou's ETF distance problem: Hbar = V^T/||V||_F, U* = argmin_{U^T U = I} ||Hbar - U Mt||_F
    (delta = 0, closed form polar(Hbar Mt)); returns (U* Mt)^T. U* is not unique (Hbar Mt 1 = 0),
    but U* Mt is when Hbar Mt has rank C-1: the free column of U* is along 1, which Mt kills."""
    return _nearest_etf_rows(V, "V")


def _nearest_etf_rows(V: Tensor, name: str) -> Tensor:
    """:func:`nearest_etf`; ``name`` is the argument its errors name."""
    H = _rows_to_hbar(V, name)
    U, _, _ = _polar(apply_mt(H), "svd")
    return apply_mt(U).mT


def nearest_etf_distance(V: Tensor, squared: bool = False) -> float:
    """Distance of the rows of ``V`` (C x d) to their nearest simplex ETF (Markou's "ETF distance").

    ``|| V^T/||V||_F - U* Mt ||_F`` with U* from :func:`nearest_etf` (delta = 0). Equivalently
    ``sqrt(2 - 2 ||Hbar Mt||_*)`` (nuclear norm). 0 exactly when V is a (rotated, scaled) simplex
    ETF; at most sqrt(2). ``squared=True`` returns the squared distance (the paper's objective).
    V is used as given (not centred): pass W, or the centred class means Mdot."""
    H = _rows_to_hbar(V, "V")
    U, _, _ = _polar(apply_mt(H), "svd")
    dist = float((H - apply_mt(U)).norm())
    return dist * dist if squared else dist


def etf_distance_between(V1: Tensor, V2: Tensor, squared: bool = False) -> float:
    """Frobenius distance between the nearest ETFs of V1 and of V2 (C x d each), Markou's distance
    "between the W-ETF and the H-ETF" (``||U1 Mt - U2 Mt||_F``; the paper's code reports its square)."""
    E1, E2 = _nearest_etf_rows(V1, "V1"), _nearest_etf_rows(V2, "V2")
    if E1.shape != E2.shape:
        raise ValueError(f"V1 and V2 must have the same shape; got {tuple(E1.shape)} and {tuple(E2.shape)}.")
    dist = float((E1 - E2).norm())
    return dist * dist if squared else dist


# --------------------------------------------------------------------------- feature means
class FeatureMeanTracker(nn.Module):
    """Running matrix of centred class means of tau-normalised features (Markou Sec. 3.2; REFERENCE Sec. 4).

    Per batch: h <- tau h/||h||; mu_G = batch mean; X_t = [mu_c - mu_G] (d x C) where a class
    absent from the batch keeps its previous column (X_t[:, c] = H_{t-1}[:, c], so H_t[:, c] =
    H_{t-1}[:, c], as the authors' ``FeaturesMovingAverageLayer``; H_0 = 0, so a class never seen
    has a zero column -- the authors fill it with mu_G instead);

        H_t = a_t X_t + (1 - a_t) H_{t-1}.detach(),   a_t = max(2/(t+1), 1e-4),
        Hbar_t = H_t/||H_t||_F,

    t counting batches over the whole run (a_1 = 1). Gradients flow from Hbar_t to this batch's
    features only. State (``H``, ``step``) lives in buffers, so it is saved by ``state_dict``.
    Vectorised: class sums by one ``index_add`` over the batch.

    ``across_ranks = True`` (set by :mod:`nc_lib.distributed` when it trains on several processes): the
    class sums, counts and the batch sum are summed over the ranks with a differentiable all-reduce, so
    every rank tracks the means of the global batch, as one process would, and the gradient reaches
    every rank's features.
    """

    across_ranks: bool = False

    def __init__(self, feature_dim: int, num_classes: int, tau: float = DEFAULT_TAU, min_rate: float = MIN_RATE) -> None:
        super().__init__()
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.tau = check_positive("tau", tau)
        self.min_rate = check_positive("min_rate", min_rate)
        self.register_buffer("H", torch.zeros(self.feature_dim, self.num_classes))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def rate(self, t: int) -> float:
        """a_t = max(2/(t+1), min_rate) for batch t = 1, 2, ..."""
        return max(2.0 / (t + 1), self.min_rate)

    def normalise(self, h: Tensor) -> Tensor:
        """tau h/||h|| per row (Markou's feature normalisation)."""
        return self.tau * F.normalize(h, dim=1)

    def _check(self, f: Tensor, labels: Tensor) -> Tensor:
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (B x {self.feature_dim}); got shape {tuple(f.shape)}.")
        labels = torch.as_tensor(labels, device=f.device)
        if labels.ndim != 1 or labels.shape[0] != f.shape[0]:
            raise ValueError(f"labels must be a 1-D tensor of length {f.shape[0]}; got shape {tuple(labels.shape)}.")
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got range "
                             f"[{int(labels.min())}, {int(labels.max())}].")
        return labels

    def update_normalised(self, f: Tensor, labels: Tensor, *, name: str = "the features f") -> tuple[Tensor, Tensor]:
        """One step on already tau-normalised features ``f`` (B x d). Returns ``(Hbar, mu_G)``.

        NaN or Inf in ``f`` raise a ValueError (``name`` is what it calls ``f``) before the state changes."""
        labels = self._check(f, labels)
        C = self.num_classes
        counts = torch.bincount(labels, minlength=C)
        sums = f.new_zeros(C, self.feature_dim).index_add(0, labels, f)
        if self.across_ranks:
            import torch.distributed as dist
            import torch.distributed.nn.functional as dist_fn

            stats = dist_fn.all_reduce(torch.cat([sums, f.sum(0, keepdim=True)]))  # differentiable
            sums, total = stats[:C], stats[C]
            n = torch.cat([counts, counts.new_tensor([f.shape[0]])])
            dist.all_reduce(n)
            counts = n[:C]
            mu_G = total / n[C].to(f.dtype)
        else:
            mu_G = f.mean(dim=0)
        means = sums / counts.clamp_min(1).to(f.dtype)[:, None]
        H_prev = self.H.to(f.dtype)
        X = torch.where((counts > 0)[None, :], (means - mu_G).mT, H_prev)
        t = host_scalar(self, "step")  # mirrored on the host: no synchronisation per step
        a = self.rate(t + 1)
        H = a * X + (1.0 - a) * H_prev
        # a NaN or Inf feature makes its class mean and mu_G, so H, non-finite: one scalar of the small d x C H
        # tells (a host sync on a GPU, as the step and the labels' range above), before the state is touched
        if not math.isfinite(float(H.detach().sum())):
            self._raise_nonfinite(f, H_prev, name)
        with torch.no_grad():
            self.step += 1
            self.H.copy_(H.detach())
        set_host_scalar(self, "step", t + 1)
        return H / H.norm(), mu_G

    def _raise_nonfinite(self, f: Tensor, H_prev: Tensor, name: str) -> None:
        """The ValueError for a non-finite H: which of ``f`` (its rows), the state, or another rank holds NaN or Inf."""
        bad = ~torch.isfinite(f).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"{name[0].upper()}{name[1:]} contain NaN or Inf, in {len(rows)} of the {f.shape[0]} "
                             f"rows of the batch (rows {rows[:10]}{' ...' if len(rows) > 10 else ''}): the class "
                             "means, and the nearest ETF solved from them, need finite features. NaN or Inf features "
                             "usually mean that training diverged (lower the learning rate); the tracker's state was "
                             "left unchanged.")
        if not bool(torch.isfinite(H_prev).all()):
            raise ValueError("the running class means H of the FeatureMeanTracker contain NaN or Inf (a state_dict "
                             "holding NaN?): reset them, or load a finite state.")
        if self.across_ranks:
            raise ValueError(f"The features of another process contain NaN or Inf ({name} here are finite; the "
                             "class means are summed over the ranks): see the error on that rank.")
        raise ValueError(f"The running class means overflow ({name} and the tracker's state are finite, but "
                         "their class means are not representable): scale the features down.")

    def forward(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise the raw features and update: returns ``(Hbar (d x C), mu_G (d,))``."""
        return self.update_normalised(self.normalise(h), labels, name="the features h")

    def hbar(self) -> Tensor:
        """The current Hbar = H/||H||_F (no gradient)."""
        return self.H / self.H.norm()


# --------------------------------------------------------------------------- moved names (one release)
#: the heads and the sampler that lived here until 0.1: still importable from here, with a DeprecationWarning
__getattr__ = moved_names(__name__, {"CosineHead": "nc_lib.heads", "ImplicitETFHead": "nc_lib.heads",
                                     "StratifiedBatchSampler": "nc_lib.data"})
