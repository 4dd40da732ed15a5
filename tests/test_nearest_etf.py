"""Tests of nc_lib.nearest_etf: tracker, solvers, backward (polar vs dense KKT, gradcheck), heads, sampler."""
from __future__ import annotations

import math

import pytest
import torch

import nc_lib.nearest_etf as ne_module
from nc_lib.data import StratifiedBatchSampler
from nc_lib.heads import CosineHead, Head, ImplicitETFHead
from nc_lib.nearest_etf import (
    FeatureMeanTracker,
    _procrustes_target,
    apply_mt,
    etf_classifier,
    etf_distance_between,
    etf_gram_target,
    kkt_backward_dense,
    nearest_etf,
    nearest_etf_distance,
    nearest_etf_node,
    nearest_etf_solve,
    polar_backward,
    polar_factor,
    riemannian_polar,
)

F64 = torch.float64

# the node's algebra runs on NumPy for small problems and on torch above NUMPY_MAX_WORK: test both
BACKENDS = {"numpy": 2**62, "torch": 0}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, monkeypatch):
    monkeypatch.setattr(ne_module, "NUMPY_MAX_WORK", BACKENDS[request.param])
    return request.param


def _stiefel(d: int, C: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, C, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _hbar(d: int, C: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(d, C, generator=g, dtype=F64)
    return H / H.norm()


def _collapsed(d: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hbar exactly an ETF times a rotation (U0 Mt, unit norm) and U_prox = U0: Z has repeated singular values."""
    U0 = _stiefel(d, C, seed)
    return U0 @ etf_gram_target(C), U0


# --------------------------------------------------------------------------- tracker
def test_tracker_rate_schedule_and_first_batch():
    tr = FeatureMeanTracker(4, 3, tau=2.0)
    assert tr.rate(1) == 1.0 and tr.rate(2) == pytest.approx(2 / 3) and tr.rate(3) == 0.5
    assert tr.rate(10**6) == 1e-4  # floored
    h = torch.randn(6, 4, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    Hbar, mu = tr(h, y)
    f = 2.0 * h / h.norm(dim=1, keepdim=True)
    X = torch.stack([f[y == c].mean(0) for c in range(3)], 1) - f.mean(0)[:, None]
    torch.testing.assert_close(tr.H.to(F64), X.float().to(F64))  # a_1 = 1: H_1 = X_1 (buffer is float32)
    torch.testing.assert_close(Hbar, X / X.norm())
    torch.testing.assert_close(mu, f.mean(0))
    assert int(tr.step) == 1


def test_tracker_running_average_and_absent_class_keeps_column():
    torch.manual_seed(0)
    tr = FeatureMeanTracker(5, 3).double()
    h1, y1 = torch.randn(9, 5, dtype=F64), torch.tensor([0, 1, 2] * 3)
    tr(h1, y1)
    H1 = tr.H.clone()
    h2, y2 = torch.randn(4, 5, dtype=F64), torch.tensor([0, 0, 1, 1])  # class 2 absent
    Hbar2, _ = tr(h2, y2)
    a2 = 2 / 3
    f2 = tr.normalise(h2)
    X2 = torch.stack([f2[y2 == c].mean(0) for c in range(2)], 1) - f2.mean(0)[:, None]
    torch.testing.assert_close(tr.H[:, :2], a2 * X2 + (1 - a2) * H1[:, :2])
    torch.testing.assert_close(tr.H[:, 2], H1[:, 2])  # absent class: column unchanged
    torch.testing.assert_close(Hbar2, tr.H / tr.H.norm())
    # gradient reaches this batch's features only, and the previous H is detached
    h3 = torch.randn(4, 5, dtype=F64, requires_grad=True)
    Hbar3, _ = tr(h3, torch.tensor([0, 1, 2, 2]))
    Hbar3.sum().backward()
    assert h3.grad is not None and torch.isfinite(h3.grad).all()
    # state round trip
    tr2 = FeatureMeanTracker(5, 3).double()
    tr2.load_state_dict(tr.state_dict())
    assert int(tr2.step) == 3 and torch.equal(tr2.H, tr.H)


def test_tracker_rejects_bad_labels():
    tr = FeatureMeanTracker(4, 3)
    with pytest.raises(ValueError, match="labels"):
        tr(torch.randn(2, 4), torch.tensor([0, 3]))


# --------------------------------------------------------------------------- solvers
def test_closed_form_is_polar_factor_and_minimiser():
    d, C, delta = 20, 6, 1e-3
    Hbar, Up = _hbar(d, C, 1), _stiefel(d, C, 2)
    U, it = nearest_etf_solve(Hbar, Up, delta)
    assert it == 0
    torch.testing.assert_close(U.mT @ U, torch.eye(C, dtype=F64), atol=1e-12, rtol=0)
    Mt = etf_gram_target(C)

    def obj(V):
        return float((Hbar - V @ Mt).norm() ** 2 + delta / 2 * (V - Up).norm() ** 2)

    best = obj(U)
    for s in range(20):  # no random nearby Stiefel point does better
        V, _, _ = polar_factor(U + 1e-2 * _hbar(d, C, 100 + s))
        assert obj(V) >= best - 1e-14
    U_gram, _ = nearest_etf_solve(Hbar, Up, delta, polar_method="gram")
    torch.testing.assert_close(U_gram, U, atol=1e-9, rtol=0)


@pytest.mark.parametrize("warm", [True, False])
def test_riemannian_agrees_with_closed_form(warm):
    d, C, delta = 30, 8, 1e-3
    Hbar, Up = _hbar(d, C, 3), _stiefel(d, C, 4)
    U_closed, _ = nearest_etf_solve(Hbar, Up, delta)
    start = polar_factor(U_closed + 0.05 * _hbar(d, C, 5))[0] if warm else None
    U_riem, it = nearest_etf_solve(Hbar, Up, delta, solver="riemannian", U_init=start, max_iter=100)
    assert 1 <= it < 100
    torch.testing.assert_close(U_riem, U_closed, atol=1e-9, rtol=0)


def test_riemannian_respects_max_iter_and_returns_count():
    Z = apply_mt(_hbar(40, 10, 6)) + 5e-4 * _stiefel(40, 10, 7)
    U, it = riemannian_polar(Z, torch.eye(40, 10, dtype=F64), max_iter=2)
    assert it == 2
    torch.testing.assert_close(U.mT @ U, torch.eye(10, dtype=F64), atol=1e-12, rtol=0)
    U_done, it_done = riemannian_polar(Z, polar_factor(Z)[0], max_iter=30)
    assert it_done <= 2  # started at the optimum


def test_delta_zero_distance_is_unique_and_zero_at_etf():
    C, d = 7, 11
    E = _stiefel(d, C, 8) @ etf_gram_target(C)  # d x C, a rotated ETF with unit Frobenius norm
    assert nearest_etf_distance(3.0 * E.mT) < 1e-12
    torch.testing.assert_close(nearest_etf(E.mT), E.mT, atol=1e-12, rtol=0)
    V = torch.randn(C, d, dtype=F64)
    dist = nearest_etf_distance(V)
    H = V.mT / V.norm()
    s = torch.linalg.svdvals(apply_mt(H))
    assert dist == pytest.approx(math.sqrt(2 - 2 * float(s.sum())), abs=1e-10)  # value via the nuclear norm
    # the Riemannian solver (another minimiser U) gives the same U Mt and distance
    U_r, _ = nearest_etf_solve(H, None, 0.0, solver="riemannian", U_init=torch.eye(d, C, dtype=F64), max_iter=200)
    torch.testing.assert_close(apply_mt(U_r).mT, nearest_etf(V), atol=1e-8, rtol=0)
    assert etf_distance_between(V, 2 * V) < 1e-12
    assert etf_distance_between(V, E.mT) > 0.1
    assert nearest_etf_distance(V, squared=True) == pytest.approx(dist**2)


def test_d_smaller_than_C_raises():
    with pytest.raises(ValueError, match="feature_dim d >= num_classes C"):
        nearest_etf_distance(torch.randn(10, 9))
    with pytest.raises(ValueError, match="d >= num_classes"):
        ImplicitETFHead(9, 10)
    with pytest.raises(ValueError, match="d >= num_classes"):
        nearest_etf_node(torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64))
    with pytest.raises(ValueError, match="solver"):
        nearest_etf_solve(_hbar(6, 3, 0), solver="newton")


# --------------------------------------------------------------------------- NaN or Inf input: a clear error, early
NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _spoilt(X: torch.Tensor, value: float, where: tuple[int, int] = (2, 1)) -> torch.Tensor:
    X = X.clone()
    X[where] = value
    return X


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy's, on the NaN, before the error
@pytest.mark.parametrize("bad", sorted(NONFINITE))
@pytest.mark.parametrize("solver", ["closed", "riemannian"])
@pytest.mark.parametrize("argument", ["Hbar", "U_prox"])
def test_node_rejects_nan_or_inf_naming_the_argument(argument, solver, bad, backend):
    """NaN or Inf in Hbar or U_prox: a ValueError naming it, not a LinAlgError from the eigensolver or the SVD."""
    Hbar, Up = _hbar(9, 4, 40), _stiefel(9, 4, 41)
    args = {"Hbar": Hbar, "U_prox": Up}
    args[argument] = _spoilt(args[argument], NONFINITE[bad])
    with pytest.raises(ValueError, match=f"^{argument} contains NaN or Inf .*the nearest-ETF node needs finite input"):
        nearest_etf_node(args["Hbar"].requires_grad_(), args["U_prox"], 1e-3, solver=solver)
    with pytest.raises(ValueError, match=f"^{argument} contains NaN or Inf"):
        nearest_etf_solve(args["Hbar"].detach(), args["U_prox"], 1e-3, solver=solver)


def test_solvers_reject_nan_or_inf_naming_the_argument():
    Hbar, Up = _hbar(9, 4, 42), _stiefel(9, 4, 43)
    nan = float("nan")
    with pytest.raises(ValueError, match="^Hbar contains NaN or Inf .1 NaN and 0 Inf among its 36 entries"):
        nearest_etf_solve(_spoilt(Hbar, nan), None, 0.0)  # no proximal term: the metrics' solve
    with pytest.raises(ValueError, match="^U_init contains NaN or Inf"):
        nearest_etf_solve(Hbar, Up, 1e-3, solver="riemannian", U_init=_spoilt(Up, nan))
    with pytest.raises(ValueError, match="^U_init contains NaN or Inf"):
        nearest_etf_node(Hbar, Up, 1e-3, solver="riemannian", U_init=_spoilt(Up, nan))
    Z = apply_mt(Hbar)
    for method in ("gram", "svd"):
        with pytest.raises(ValueError, match="^Z contains NaN or Inf .*polar_factor"):
            polar_factor(_spoilt(Z, float("inf")), method)
    with pytest.raises(ValueError, match="^Z contains NaN or Inf .*riemannian_polar"):
        riemannian_polar(_spoilt(Z, nan))
    with pytest.raises(ValueError, match="^U0 contains NaN or Inf .*riemannian_polar"):
        riemannian_polar(Z, _spoilt(Up, nan))
    # with delta = 0 the proximal term is not used: a NaN in U_prox does not matter
    U, _ = nearest_etf_solve(Hbar, _spoilt(Up, nan), 0.0)
    assert torch.isfinite(U).all()


def test_nearest_etf_distance_of_nan_says_nan_not_zero():
    V = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(44))
    for bad in NONFINITE.values():
        with pytest.raises(ValueError, match="^V contains NaN or Inf .*ETF distances"):
            nearest_etf_distance(_spoilt(V, bad))
        with pytest.raises(ValueError, match="^V contains NaN or Inf"):
            nearest_etf(_spoilt(V, bad))
        with pytest.raises(ValueError, match="^V2 contains NaN or Inf"):
            etf_distance_between(V, _spoilt(V, bad))
    with pytest.raises(ValueError, match="^V is zero"):  # a zero matrix still says so
        nearest_etf_distance(torch.zeros(4, 9))
    # entries whose squares under- or overflow are neither NaN nor zero: the same distance as at unit scale
    dist = nearest_etf_distance(V)
    for scale in (1e-200, 1e200):
        assert nearest_etf_distance(scale * V) == pytest.approx(dist, abs=1e-12)


@pytest.mark.parametrize("bad", sorted(NONFINITE))
def test_implicit_head_rejects_nan_or_inf_features_and_keeps_its_state(bad):
    """h with NaN or Inf: a ValueError naming h and its rows, raised before the tracker's state changes."""
    torch.manual_seed(45)
    d, C, B = 8, 4, 16
    y = torch.arange(B) % C
    h_bad = _spoilt(torch.randn(B, d), NONFINITE[bad], (5, 3))
    fresh = ImplicitETFHead(d, C)
    with pytest.raises(ValueError, match=r"^ImplicitETFHead: the features h contain NaN or Inf, in 1 of the 16 rows "
                                         r"of the batch \(rows \[5\]\)"):
        fresh(h_bad, y)  # the first batch
    assert int(fresh.tracker.step) == 0 and not bool(fresh.initialised)
    head = ImplicitETFHead(d, C)
    head(torch.randn(B, d), y)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="^ImplicitETFHead: the features h contain NaN or Inf"):
        head(h_bad.requires_grad_(), y)  # a later batch
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    out = head(torch.randn(B, d), y)  # the head goes on with finite features
    assert torch.isfinite(out).all() and int(head.tracker.step) == 2
    tracker = FeatureMeanTracker(d, C)
    with pytest.raises(ValueError, match=r"^The features h contain NaN or Inf.*rows \[5\]"):
        tracker(h_bad.detach(), y)
    with pytest.raises(ValueError, match=r"^The features f contain NaN or Inf"):
        tracker.update_normalised(h_bad.detach(), y)
    assert int(tracker.step) == 0 and not tracker.H.any()


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize("collapsed", [False, True])
def test_polar_backward_matches_dense_kkt(collapsed, backend):
    d, C, delta = 13, 6, 1e-3
    Hbar, Up = _collapsed(d, C, 9) if collapsed else (_hbar(d, C, 10), _stiefel(d, C, 11))
    Z = _procrustes_target(Hbar, Up, delta)
    U, S, B = polar_factor(Z, "svd")
    if collapsed:  # repeated singular values 1/(C-1) + delta/2, and one delta/2
        torch.testing.assert_close(S[:-1], torch.full((C - 1,), 1 / (C - 1) + delta / 2, dtype=F64))
    G = torch.randn(d, C, dtype=F64, generator=torch.Generator().manual_seed(12))
    dZ = polar_backward(U, S, B, G)
    kH, kP = kkt_backward_dense(Hbar, Up, U, G, delta)
    scale = float(kH.abs().max())
    assert float((apply_mt(dZ) - kH).abs().max()) <= 1e-8 * max(1.0, scale)
    assert float((0.5 * delta * dZ - kP).abs().max()) <= 1e-8 * max(1.0, scale)
    # and through the autograd Function
    Hr, Pr = Hbar.clone().requires_grad_(), Up.clone().requires_grad_()
    U_node, _ = nearest_etf_node(Hr, Pr, delta)
    (U_node * G).sum().backward()
    assert float((Hr.grad - kH).abs().max()) <= 1e-8 * max(1.0, scale)
    assert float((Pr.grad - kP).abs().max()) <= 1e-8 * max(1.0, scale)


@pytest.mark.parametrize("solver,backend_name", [("closed", "numpy"), ("closed", "torch"), ("riemannian", "numpy")])
@pytest.mark.parametrize("collapsed", [False, True])
def test_gradcheck(solver, backend_name, collapsed, monkeypatch):
    monkeypatch.setattr(ne_module, "NUMPY_MAX_WORK", BACKENDS[backend_name])
    d, C = 7, 4
    Hbar, Up = _collapsed(d, C, 13) if collapsed else (_hbar(d, C, 14), _stiefel(d, C, 15))
    Hr, Pr = Hbar.clone().requires_grad_(), Up.clone().requires_grad_()
    start, _ = nearest_etf_solve(Hbar, Up, 1e-3)  # warm start, as in training (fewer iterations)

    def f(a, b):
        return nearest_etf_node(a, b, 1e-3, solver=solver, U_init=start, max_iter=100)[0]

    assert torch.autograd.gradcheck(f, (Hr, Pr))


def test_autograd_through_svd_fails_at_collapse_but_node_does_not():
    """Why the custom backward: torch.linalg.svd's backward divides by s_i^2 - s_j^2."""
    Hbar, Up = _collapsed(8, 4, 16)
    Hr = Hbar.clone().requires_grad_()
    Z = apply_mt(Hr) + 5e-4 * Up
    A, S, Bh = torch.linalg.svd(Z, full_matrices=False)
    (A @ Bh)[0, 0].backward()
    naive_ok = bool(torch.isfinite(Hr.grad).all())
    Hr2 = Hbar.clone().requires_grad_()
    nearest_etf_node(Hr2, Up, 1e-3)[0][0, 0].backward()
    assert torch.isfinite(Hr2.grad).all()
    if naive_ok:  # some builds return finite garbage instead of inf/nan: then it must disagree
        assert not torch.allclose(Hr.grad, Hr2.grad, atol=1e-6)


def test_backward_without_prox_term_raises(backend):
    Hr = _hbar(6, 3, 17).requires_grad_()
    U, _ = nearest_etf_node(Hr, torch.zeros(6, 3, dtype=F64), 0.0)
    with pytest.raises(ValueError, match="rank"):
        U.sum().backward()


def test_inplace_change_of_the_output_is_caught(backend):
    """The backward reads the output U (on NumPy it shares its memory): an in-place edit must not go unnoticed."""
    Hr = _hbar(9, 4, 30).requires_grad_()
    U, _ = nearest_etf_node(Hr, _stiefel(9, 4, 31), 1e-3)
    U.mul_(2.0)
    with pytest.raises(RuntimeError, match="in-?place"):
        U.sum().backward()


def test_backward_is_once_differentiable(backend):
    """create_graph=True gives the gradient, and differentiating it again raises (as @once_differentiable)."""
    Hbar, Up = _hbar(9, 4, 32), _stiefel(9, 4, 33)
    G = torch.randn(9, 4, dtype=F64, generator=torch.Generator().manual_seed(34))
    Hr = Hbar.clone().requires_grad_()
    (g1,) = torch.autograd.grad((nearest_etf_node(Hr, Up, 1e-3)[0] ** 2 * G).sum(), Hr)
    Hr2 = Hbar.clone().requires_grad_()
    (g2,) = torch.autograd.grad((nearest_etf_node(Hr2, Up, 1e-3)[0] ** 2 * G).sum(), Hr2, create_graph=True)
    torch.testing.assert_close(g2.detach(), g1, atol=1e-14, rtol=0)
    with pytest.raises(RuntimeError, match="twice"):
        g2.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("delta", [1e-3, 1e-7, 1e-10])
def test_node_matches_svd_polar_factor_at_any_conditioning(delta, dtype, backend):
    """cond(Z) ~ 1/delta: the Gram route (+ Newton-Schulz) where it is accurate, the SVD beyond GRAM_MAX_ERR."""
    d, C = 20, 10
    U0 = _stiefel(d, C, 35)
    Hbar = U0 @ etf_gram_target(C) + 1e-3 * _hbar(d, C, 36)
    Hbar = (Hbar / Hbar.norm()).to(dtype).to(F64)  # representable in dtype: the same Z for both dtypes
    Up = _stiefel(d, C, 37).to(dtype).to(F64)
    A, S, Bh = torch.linalg.svd(apply_mt(Hbar) + 0.5 * delta * Up, full_matrices=False)
    U, _ = nearest_etf_node(Hbar.to(dtype), Up.to(dtype), delta)
    assert U.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-9 * max(1.0, 1e-7 / delta)  # the SVD's own error ~ eps cond
    assert float((U.to(F64) - A @ Bh).abs().max()) < tol


def test_numpy_eigh_fallback_agrees(monkeypatch):
    """Without SciPy's LAPACK wrapper the NumPy path uses numpy.linalg.eigh: same node."""
    Hbar, Up = _hbar(30, 8, 38), _stiefel(30, 8, 39)
    G = torch.randn(30, 8, dtype=F64, generator=torch.Generator().manual_seed(40))
    out = []
    for lapack in (None, False):
        monkeypatch.setattr(ne_module, "_LAPACK_SYEVD", lapack)
        Hr = Hbar.clone().requires_grad_()
        U, _ = nearest_etf_node(Hr, Up, 1e-3)
        (U * G).sum().backward()
        out.append((U.detach(), Hr.grad))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-13, rtol=0)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-9, rtol=1e-9)


def test_float32_node_close_to_float64(backend):
    d, C = 64, 10
    Hbar, Up = _hbar(d, C, 18), _stiefel(d, C, 19)
    G = torch.randn(d, C, dtype=F64, generator=torch.Generator().manual_seed(20))
    out = []
    for dt in (torch.float32, F64):
        Hr = Hbar.to(dt).requires_grad_()
        U, _ = nearest_etf_node(Hr, Up.to(dt), 1e-3)
        (U * G.to(dt)).sum().backward()
        out.append((U.to(F64), Hr.grad.to(F64)))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=0)
    rel = float((out[0][1] - out[1][1]).norm() / out[1][1].norm())
    assert rel < 1e-4


# --------------------------------------------------------------------------- heads
def test_etf_classifier_rows_form_simplex_etf():
    W = etf_classifier(_stiefel(9, 5, 21))
    G = W @ W.mT
    torch.testing.assert_close(torch.diagonal(G), torch.ones(5, dtype=F64))
    off = G[~torch.eye(5, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 4))


def test_cosine_head():
    torch.manual_seed(0)
    head = CosineHead(6, 3, tau=4.0)
    assert isinstance(head, Head) and head.renormalise_after_step
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))
    h = torch.randn(5, 6)
    logits = head(h)
    W, b = head.classifier()
    torch.testing.assert_close(logits, 4.0 * (h / h.norm(dim=1, keepdim=True)) @ W.T + b)
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    torch.nn.functional.cross_entropy(head(h), torch.tensor([0, 1, 2, 0, 1])).backward()
    opt.step()
    assert not torch.allclose(head.weight.norm(dim=1), torch.ones(3))
    head.renormalise_()
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("solver", ["closed", "riemannian"])
def test_implicit_head_trains_and_round_trips(solver):
    torch.manual_seed(0)
    d, C, B = 16, 4, 32
    body = torch.nn.Linear(10, d)
    head = ImplicitETFHead(d, C, solver=solver)
    assert isinstance(head, Head) and head.needs_labels
    assert not any(True for _ in head.parameters())  # W, b are not optimiser parameters
    opt = torch.optim.SGD(body.parameters(), lr=0.1)
    x = torch.randn(B, 10)
    y = torch.arange(B) % C
    with pytest.raises(ValueError, match="labels"):
        head(body(x))
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(head(body(x), y), y)
        opt.zero_grad()
        loss.backward()
        assert body.weight.grad is not None and torch.isfinite(body.weight.grad).all()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    W, b = head.classifier()
    G = W @ W.T
    torch.testing.assert_close(torch.diagonal(G), torch.ones(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(head.U_prox.T @ head.U_prox, torch.eye(C), atol=1e-5, rtol=0)
    if solver == "riemannian":
        assert head.last_iterations >= 0
    # state_dict round trip gives the same eval logits
    head.eval()
    with torch.no_grad():
        h_test = body(torch.randn(7, 10))
        ref = head(h_test)
    head2 = ImplicitETFHead(d, C, solver=solver)
    head2.load_state_dict(head.state_dict())
    head2.eval()
    with torch.no_grad():
        torch.testing.assert_close(head2(h_test), ref)
    assert int(head2.tracker.step) == 10 and bool(head2.initialised)
    f = 5.0 * h_test / h_test.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ref, f @ W.T + b)


def test_implicit_head_stop_gradient_ablation():
    torch.manual_seed(1)
    d, C = 8, 3
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    grads = {}
    for through in (True, False):
        h = torch.randn(6, d, generator=torch.Generator().manual_seed(3)).requires_grad_()
        head = ImplicitETFHead(d, C, backprop_through_node=through)
        head(h.detach(), y)  # one step to set U_prox
        out = head(h, y)
        torch.nn.functional.cross_entropy(out, y).backward()
        grads[through] = h.grad.clone()
    assert torch.isfinite(grads[False]).all() and grads[False].abs().sum() > 0
    assert not torch.allclose(grads[True], grads[False])


# --------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("imbalanced", [False, True])
def test_stratified_sampler_every_class_every_batch(imbalanced):
    g = torch.Generator().manual_seed(0)
    if imbalanced:
        labels = torch.cat([torch.zeros(200), torch.ones(50), torch.full((3,), 2), torch.full((47,), 3)]).long()
    else:
        labels = torch.randint(0, 10, (1000,), generator=g)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    C = int(labels.max()) + 1
    s = StratifiedBatchSampler(labels, batch_size=64, seed=5)
    batches = list(s)
    assert len(batches) == len(s) == math.ceil(labels.numel() / 64)
    for b in batches:
        assert set(labels[b].tolist()) == set(range(C))
    flat = [i for b in batches for i in b]
    assert set(flat) == set(range(labels.numel()))  # every sample is used
    if not imbalanced:
        assert len(flat) == labels.numel() and max(len(b) for b in batches) <= 64
    # deterministic per seed, different per epoch
    s2 = StratifiedBatchSampler(labels, batch_size=64, seed=5)
    assert list(s2) == batches
    assert list(s2) != batches
    s2.set_epoch(0)
    assert list(s2) == batches
    assert list(StratifiedBatchSampler(labels, batch_size=64, seed=6)) != batches


def test_stratified_sampler_more_classes_than_batch():
    labels = torch.arange(300) % 30
    batches = list(StratifiedBatchSampler(labels, batch_size=10, seed=0))
    assert len(batches) == 30
    assert all(len(set(labels[b].tolist())) == 10 for b in batches)  # distinct classes in each batch
    assert sorted(i for b in batches for i in b) == list(range(300))


# --------------------------------------------------------------------------- benchmark smoke test
def test_benchmark_script_quick(tmp_path, monkeypatch, capsys):
    """The benchmark's --quick path end to end (sizes shrunk so that it takes a second)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_nearest_etf.py"
    spec = importlib.util.spec_from_file_location("bench_nearest_etf", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "QUICK_SIZES", [(4, 16)])
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "r.json").exists()
    rows = out["rows"]
    assert [(r["C"], r["d"], r["dtype"]) for r in rows] == [(4, 16, "float32"), (4, 16, "float64")]
    for r in rows:
        assert r["closed_fb_s"] > 0 and r["svd_s"] > 0 and r["reference_skipped"] is None
        assert r["reference_fb_s"] > 0
    assert "x SVD" in capsys.readouterr().out


def test_heads_and_sampler_moved_out_still_import_with_a_deprecation_warning():
    import nc_lib.data
    import nc_lib.heads

    for name, home in (("ImplicitETFHead", nc_lib.heads), ("CosineHead", nc_lib.heads),
                       ("StratifiedBatchSampler", nc_lib.data)):
        with pytest.warns(DeprecationWarning, match=f"{home.__name__}.{name}"):
            assert getattr(ne_module, name) is getattr(home, name)
    with pytest.warns(DeprecationWarning):
        from nc_lib.nearest_etf import ImplicitETFHead as old
    assert old is ImplicitETFHead
    with pytest.raises(AttributeError):
        ne_module.no_such_name


def test_tracker_refuses_class_means_that_overflow():
    """Finite but huge float32 features whose class sums overflow: an error, not a silent non-finite state."""
    d, C, B = 8, 4, 16
    y = torch.arange(B) % C
    tracker = FeatureMeanTracker(d, C)
    with pytest.raises(ValueError, match="^The running class means overflow"):
        tracker.update_normalised(torch.full((B, d), 3e38), y)
    assert int(tracker.step) == 0 and not tracker.H.any()
