"""The implicit ETF head's fused training step (issue 16 section 3): the same numbers and gradients as the general
route, the routes it declines, its host mirrors, and guards on its dispatches and host synchronisations per step."""
from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nc_lib.nearest_etf as ne
from nc_lib.heads import ImplicitETFHead

F64 = torch.float64
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_implicit_head.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_implicit_head", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pair(d: int, C: int, dtype=torch.float32, steps: int = 3, seed: int = 0, **kw):
    """A fused head after ``steps`` training steps and a copy of it that takes the general route."""
    torch.manual_seed(seed)
    head = ImplicitETFHead(d, C, **kw).to(dtype)
    head.fused_step = True
    y = torch.arange(3 * C) % C
    for _ in range(steps):
        head(torch.randn(3 * C, d, dtype=dtype), y)
    ref = copy.deepcopy(head)
    ref.fused_step = False
    return head, ref


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-6)


def _assert_same_step(head, ref, h, y, dtype, G=None):
    """One training step of both heads: the same logits, gradient and state (to float rounding)."""
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    out1, out2 = head(h1, y), ref(h2, y)
    torch.testing.assert_close(out1, out2, **_tol(dtype))
    if G is None:
        G = torch.randn(out1.shape, dtype=out1.dtype, generator=torch.Generator().manual_seed(7))
    (g1,) = torch.autograd.grad(out1, h1, G)
    (g2,) = torch.autograd.grad(out2, h2, G)
    torch.testing.assert_close(g1, g2, **_tol(dtype))
    s1, s2 = head.state_dict(), ref.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        if s1[k].is_floating_point():
            torch.testing.assert_close(s1[k], s2[k], **_tol(dtype), msg=k)
        else:
            assert torch.equal(s1[k], s2[k]), k


# --------------------------------------------------------------------------- the same numbers
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("through", [True, False])
@pytest.mark.parametrize("C,d", [(5, 12), (40, 48)])  # the host solve on NumPy (C <= 32) and on torch
def test_fused_step_matches_the_general_route(dtype, through, C, d):
    head, ref = _pair(d, C, dtype, backprop_through_node=through)
    y = torch.arange(3 * C) % C
    for step in range(3):
        h = torch.randn(3 * C, d, dtype=dtype, generator=torch.Generator().manual_seed(10 + step))
        _assert_same_step(head, ref, h, y, dtype)
    assert int(head.tracker.step) == int(ref.tracker.step) == 6


@pytest.mark.parametrize("newton_schulz", [True, False])
@pytest.mark.parametrize("numpy_host", [True, False])
def test_fused_step_gradcheck(newton_schulz, numpy_host, monkeypatch):
    """The fused backward is the exact derivative of the fused forward (float64), with and without the
    Newton-Schulz step, with the host solve on NumPy and on torch."""
    monkeypatch.setattr(ne, "NS_THRESHOLD", 0.0 if newton_schulz else float("inf"))
    monkeypatch.setattr(ne, "FUSED_NUMPY_MAX_C", 32 if numpy_host else 0)
    head, _ = _pair(6, 3, F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # unequal class counts

    def step(h):
        return copy.deepcopy(head)(h, y)  # a fresh copy of the state for every evaluation

    h = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(step, (h,))


def test_fused_step_matches_the_general_route_in_corner_cases():
    """A class absent from the batch keeps its column; a zero row and a row below F.normalize's eps get
    F.normalize's gradient; unequal class counts."""
    d, C = 10, 4
    head, ref = _pair(d, C, F64)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])  # class 3 absent
    h = torch.randn(8, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    h[2] = 0.0
    h[5] = 3e-14  # ||h|| < 1e-12: the clamped branch of F.normalize
    before = head.tracker.H[:, 3].clone()
    _assert_same_step(head, ref, h, y, F64)
    assert torch.equal(head.tracker.H[:, 3], before)


def test_fused_step_half_precision_and_autocast():
    """bfloat16 features are normalised in float32 (as the general route does under autocast); autocast does
    not lower the fused step's products; the gradient comes back in the input's dtype."""
    d, C = 12, 4
    head, _ = _pair(d, C)
    y = torch.arange(12) % C
    h = torch.randn(12, d, generator=torch.Generator().manual_seed(2)).bfloat16()
    ref32 = copy.deepcopy(head)
    ref32.fused_step = False
    hb = h.clone().requires_grad_()
    out = head(hb, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref32(h.float(), y), rtol=2e-5, atol=2e-6)
    out.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(hb.grad.float()).all()
    h32 = torch.randn(12, d, generator=torch.Generator().manual_seed(4))
    plain = copy.deepcopy(head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = head(h32, y)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain(h32, y), rtol=0, atol=0)


def test_fused_step_is_once_differentiable():
    head, _ = _pair(8, 3)
    h = torch.randn(6, 8, requires_grad=True)
    y = torch.arange(6) % 3
    (g,) = torch.autograd.grad(F.cross_entropy(head(h, y), y), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


# --------------------------------------------------------------------------- where it declines
def test_routes_that_run_the_general_step(monkeypatch):
    """The first step, the Riemannian solver, polar_method="svd", a tracker across ranks and large problems on
    the CPU (fused_step=None) take the general route; labels outside [0, C) raise its error, state unchanged."""
    calls = []
    real = ImplicitETFHead._general_forward
    monkeypatch.setattr(ImplicitETFHead, "_general_forward", lambda self, h, y: calls.append(1) or real(self, h, y))
    d, C, B = 8, 4, 8
    y = torch.arange(B) % C

    def general_steps(head, n=2):
        calls.clear()
        for _ in range(n):
            head(torch.randn(B, d), y)
        return len(calls)

    assert general_steps(ImplicitETFHead(d, C)) == 1  # the first step only
    assert general_steps(ImplicitETFHead(d, C, solver="riemannian")) == 2
    assert general_steps(ImplicitETFHead(d, C, polar_method="svd")) == 2
    head = ImplicitETFHead(d, C)
    general_steps(head, 1)
    head.tracker.across_ranks = True  # (a step across ranks needs a process group: check the routing only)
    assert head._fused_forward(torch.randn(B, d), y) is None
    head.tracker.across_ranks = False
    monkeypatch.setattr(ne, "NUMPY_MAX_WORK", 0)  # every problem "large": the CPU takes the general route
    assert general_steps(head) == 2
    head.fused_step = True
    assert general_steps(head) == 0
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        head(torch.randn(B, d), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        head(torch.randn(B, d), torch.tensor([0, 1, 2, 3, -1, 0, 1, 2]))
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_zero_running_means_decline_to_the_general_route():
    """H = 0 (from a zero start, a batch whose features are all equal): the fused step declines, the general
    route reports the NaN it leads to, as before."""
    head, ref = _pair(6, 3)
    head.tracker.H.zero_()
    ref.tracker.H.zero_()
    y = torch.tensor([0, 1, 2, 0])
    h = torch.randn(1, 6).repeat(4, 1)
    with pytest.raises(ValueError, match="Hbar contains NaN"):
        ref(h, y)
    with pytest.raises(ValueError, match="Hbar contains NaN"):
        head(h, y)


# --------------------------------------------------------------------------- host mirrors
def test_host_mirrors_follow_loads_and_resume_bit_identically():
    """The step counter and the initialised flag are read on the host once; a load_state_dict (into the same
    head or a fresh one) is seen, and a resumed head continues exactly as the uninterrupted one."""
    d, C, B = 8, 4, 12
    y = torch.arange(B) % C
    hs = [torch.randn(B, d, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    head = ImplicitETFHead(d, C)
    for h in hs[:3]:
        head(h, y)
    saved = copy.deepcopy(head.state_dict())
    outs = [head(h, y) for h in hs[3:]]
    assert ne.host_scalar(head.tracker, "step") == 8
    fresh = ImplicitETFHead(d, C)
    fresh.load_state_dict(saved)
    head.load_state_dict(saved)  # the same head, its mirror now stale: read again
    assert ne.host_scalar(head.tracker, "step") == 3
    for h, out in zip(hs[3:], outs):
        assert torch.equal(fresh(h, y), out)
        assert torch.equal(head(h, y), out)
    rate_seen = []
    orig = ne.FeatureMeanTracker.rate
    head.tracker.rate = lambda t: rate_seen.append(t) or orig(head.tracker, t)
    head.tracker.step.fill_(100)  # an in-place write is seen too
    head(hs[0], y)
    assert rate_seen == [101] and int(head.tracker.step) == 101


# --------------------------------------------------------------------------- dispatches and synchronisations
@pytest.mark.parametrize("C", [10, 100])
def test_fused_step_dispatches_and_host_syncs(C):
    """Regression guard (issue 16 section 3): one training step of the fused head (forward, cross-entropy,
    backward; B = 128, d = 512) makes one host synchronisation (the Gram's read-back) and few dispatches.
    Measured with benchmarks/bench_implicit_head.py (torch 2.14, CPU): 71 top-level aten ops for C = 10 and 69
    for C = 100 (its host solve on torch is apart), 1 sync; the general route: 177 ops and 7 syncs (179 and 9
    before the host mirrors), the linear head: 16 ops, 0 syncs."""
    bench = _bench()
    with bench.route("implicit_fused") as setup:
        fused = bench.count_step(setup(ImplicitETFHead(512, C)), *bench.inputs(C))
    assert fused["syncs"] <= 1, fused
    assert fused["top_ops"] <= 71, fused  # measured 71 (C = 10) and 69 (C = 100)
    with bench.route("implicit_general") as setup:
        general = bench.count_step(setup(ImplicitETFHead(512, C)), *bench.inputs(C))
    assert general["top_ops"] > 2 * fused["top_ops"] and general["syncs"] > fused["syncs"]


def test_sync_counter_sees_host_reads():
    bench = _bench()
    t = torch.randn(3)
    with bench.SyncCounter() as sc:
        t.cpu(), t.tolist(), t.numpy(), t.numpy(force=True), t.to("cpu"), t.to("cpu", non_blocking=True), t.to(F64)
    assert sc.calls == {"cpu": 1, "tolist": 1, "numpy": 1, "to": 1}


def test_benchmark_script_quick(tmp_path, capsys):
    """The benchmark end to end on a tiny problem."""
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--sizes", "4", "--dim", "16", "--batch", "8", "--pairs", "2", "--no-cuda",
                          "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "r.json").exists()
    assert [r["row"] for r in out["rows"]] == ["linear", *bench.ROWS]
    fused = out["rows"][2]
    assert fused["syncs"] == 1 and fused["cpu_ratio"] > 0
    assert "implicit_fused" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_step_on_cuda_matches_cpu_with_one_sync():
    d, C, B = 64, 10, 40
    head, _ = _pair(d, C, F64)
    gpu = copy.deepcopy(head).cuda()
    y = torch.arange(B) % C
    yg = y.cuda()
    hs = [torch.randn(B, d, dtype=F64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    head(hs[0], y)
    gpu(hs[0].cuda(), yg)  # a first step on CUDA: the host mirrors read the moved buffers once
    h = hs[1].clone().requires_grad_()
    hg = hs[1].cuda().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out_g = gpu(hg, yg)
            out_g.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    out = head(h, y)
    out.sum().backward()
    torch.testing.assert_close(out_g.cpu(), out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hg.grad.cpu(), h.grad, rtol=1e-10, atol=1e-12)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[k].cpu(), v, rtol=1e-10, atol=1e-12, msg=k)
