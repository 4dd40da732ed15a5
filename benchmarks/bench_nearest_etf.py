"""Benchmark of the nearest-simplex-ETF node (nc_lib.nearest_etf): forward + backward cost.

For (C, d) in (10, 512), (100, 512), (100, 2048), (1000, 2048) and float32 / float64 it times

* ``closed``      -- this kit's node: closed-form polar factor + O(dC^2) polar backward;
* ``riemannian``  -- the Riemannian trust-region forward (warm start) + the same backward;
* ``reference``   -- the paper's route: Riemannian forward + dense KKT backward
                     (:func:`nc_lib.nearest_etf.kkt_backward_dense`), only where its estimated memory
                     fits in 8 GiB and its estimated time in 5 minutes (else skipped, with the reason);
* ``svd``         -- one thin SVD of a d x C matrix: the floor any exact solver pays.

and prints a table (times: best of ``--repeats`` runs, more for calls under a millisecond, so
that each measurement spans at least 0.3 s; ratio closed/svd: the median over back-to-back pairs
of calls, which both see the same load, at least 4 x ``--repeats`` pairs and at least 1 s of
them (at most 2000 pairs); ratio reference/closed;
peak memory: the largest rise of the process's resident memory during the call, sampled every
0.5 ms from /proc/self/statm, and the analytic size of the matrices involved). Targets: closed
fwd+bwd within 3x of the thin SVD at every size; C = 1000, d = 2048 under 1 s on 2 cores.
Last, the node's share of one ResNet18 training step with the implicit ETF head (CIFAR10 shapes, C = 10,
d = 512, batch ``--resnet-batch``).

Results also go to ``benchmarks/results/nearest_etf.json`` (``--quick``: the two small sizes only,
to ``nearest_etf_quick.json``; ``--json`` overrides the path). Usage:

    .venv/bin/python benchmarks/bench_nearest_etf.py [--quick] [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nc_lib.nearest_etf import (  # noqa: E402
    etf_gram_target,
    kkt_backward_dense,
    kkt_memory_bytes,
    nearest_etf_node,
    polar_factor,
    riemannian_polar,
)

SIZES = [(10, 512), (100, 512), (100, 2048), (1000, 2048)]
QUICK_SIZES = [(10, 512), (100, 512)]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MEM_LIMIT = 8 * 2**30
TIME_LIMIT = 300.0
RESULTS = Path(__file__).resolve().parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except OSError:  # not Linux: fall back on the high-water mark
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Largest rise of resident memory above its value at entry, sampled every 0.5 ms by a thread."""

    def __enter__(self) -> "PeakMemory":
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def rise_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def best_time(fn: Callable[[], object], repeats: int, budget_s: float = 20.0, min_s: float = 0.3,
              max_calls: int = 1000) -> tuple[float, float]:
    """(best seconds over one warm-up call plus ``repeats`` calls, fewer when they would exceed
    ``budget_s`` and more, up to ``max_calls``, while they take less than ``min_s`` together: the
    best of a few calls of 0.1 ms is mostly noise; peak memory rise in MB during the first call)."""
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    times = [first]
    n = repeats if first * repeats < budget_s else int(budget_s / max(first, 1e-9))  # slow calls: fewer repeats
    start = time.perf_counter()
    while len(times) <= n or (first < min_s and time.perf_counter() - start < min_s and len(times) <= max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), mem.rise_mb


def paired_ratio(f_num: Callable[[], object], f_den: Callable[[], object], pairs: int,
                 budget_s: float = 20.0, min_s: float = 1.0, max_pairs: int = 2000) -> float:
    """Median over back-to-back pairs of time(f_num)/time(f_den): robust to load that changes
    between measurements (other processes sharing the cores), since both see the same load.
    At least ``pairs`` pairs (fewer when they exceed ``budget_s``), and more, up to ``max_pairs``,
    while they take less than ``min_s``: for sub-millisecond calls 20 pairs leave the median noisy."""
    ratios = []
    t_start = time.perf_counter()
    while len(ratios) < pairs or (time.perf_counter() - t_start < min_s and len(ratios) < max_pairs):
        t0 = time.perf_counter()
        f_den()
        t1 = time.perf_counter()
        f_num()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        if time.perf_counter() - t_start > budget_s:
            break
    ratios.sort()
    return ratios[len(ratios) // 2]


def gemm_rate(dtype: torch.dtype) -> float:
    """Measured flop/s of a 768^3 matrix product (for the reference's time estimate)."""
    n = 768
    a = torch.randn(n, n, dtype=dtype)
    t, _ = best_time(lambda: a @ a, 3)
    return 2 * n**3 / t


def make_inputs(C: int, d: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hbar near a rotated ETF (as during training), U_prox = the previous step's solution, and a
    random upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    U0, _, _ = polar_factor(torch.randn(d, C, generator=g, dtype=torch.float64), "svd")
    Mt = etf_gram_target(C)

    def noisy(scale: float) -> torch.Tensor:
        H = U0 @ Mt + scale * torch.randn(d, C, generator=g, dtype=torch.float64) / math.sqrt(d * C)
        return H / H.norm()

    H_prev, Hbar = noisy(0.5), noisy(0.5)
    U_prox, _, _ = polar_factor(H_prev @ Mt, "svd")  # the previous step's solution (rank-deficient Z: any completion)
    G = torch.randn(d, C, generator=g, dtype=torch.float64)
    return {k: v.to(dtype) for k, v in dict(Hbar=Hbar, U_prox=U_prox, G=G).items()}


def run_case(C: int, d: int, dtype_name: str, repeats: int, with_reference: bool, rate: float) -> dict:
    dtype = DTYPES[dtype_name]
    x = make_inputs(C, d, dtype)
    Hbar, U_prox, G = x["Hbar"], x["U_prox"], x["G"]
    item = torch.finfo(dtype).bits // 8
    row: dict = {"C": C, "d": d, "dtype": dtype_name}

    def closed_fb() -> None:
        H = Hbar.clone().requires_grad_()
        U, _ = nearest_etf_node(H, U_prox, 1e-3)
        U.backward(G)

    def closed_fwd() -> None:
        with torch.no_grad():
            nearest_etf_node(Hbar, U_prox, 1e-3)

    iters = {}

    def riem_fb() -> None:
        H = Hbar.clone().requires_grad_()
        U, it = nearest_etf_node(H, U_prox, 1e-3, solver="riemannian", max_iter=30)
        iters["n"] = it
        U.backward(G)

    Z = Hbar.clone()
    row["svd_s"], row["svd_mem_mb"] = best_time(lambda: torch.linalg.svd(Z, full_matrices=False), repeats)
    row["closed_fb_s"], row["closed_mem_mb"] = best_time(closed_fb, repeats)
    row["closed_fwd_s"], _ = best_time(closed_fwd, repeats)
    # in the input dtype: Hbar, U_prox, the output U, the upstream gradient, dL/dHbar and two d x C
    # temporaries of the backward; in float64: Zc, U0 and (Newton-Schulz) U; about ten C x C factors
    row["closed_model_mb"] = (item * 7 * d * C + 8 * (3 * d * C + 10 * C * C)) / 2**20
    row["riemannian_fb_s"], row["riemannian_mem_mb"] = best_time(riem_fb, max(1, repeats // 2))
    row["riemannian_iterations"] = iters.get("n")
    row["ratio_closed_to_svd_best"] = row["closed_fb_s"] / row["svd_s"]
    row["ratio_closed_to_svd"] = paired_ratio(closed_fb, lambda: torch.linalg.svd(Z, full_matrices=False),
                                              max(3, 4 * repeats))
    row["riemannian_to_closed"] = row["riemannian_fb_s"] / row["closed_fb_s"]

    mem = kkt_memory_bytes(C, d, dtype) + item * 8 * d * C
    p = C * (C + 1) // 2
    est_t = (2.0 * p * p * d * C + 2.0 * p * d * C * C) / rate
    row["reference_model_mb"] = mem / 2**20
    row["reference_est_s"] = est_t
    reason = None
    if not with_reference:
        reason = "reference disabled (--no-reference)"
    elif mem > MEM_LIMIT:
        reason = (f"dense KKT needs ~{mem / 2**30:.1f} GiB > 8 GiB (A: C(C+1)/2 x dC = {p} x {d * C})")
    elif est_t > TIME_LIMIT:
        reason = f"dense KKT estimated at ~{est_t:.0f} s > 300 s (2 p^2 dC flops at {rate / 1e9:.0f} GFLOP/s)"
    row["reference_skipped"] = reason
    if reason is None:
        def reference() -> None:
            Z64 = (Hbar.to(torch.float64) @ etf_gram_target(C)) + 5e-4 * U_prox.to(torch.float64)
            U, _ = riemannian_polar(Z64, U_prox.to(torch.float64), max_iter=30)
            kkt_backward_dense(Hbar, U_prox, U.to(dtype), G, 1e-3, max_bytes=MEM_LIMIT)

        t0 = time.perf_counter()
        with PeakMemory() as pm:
            reference()
        row["reference_fb_s"] = time.perf_counter() - t0
        row["reference_mem_mb"] = pm.rise_mb
        row["ratio_reference_to_closed"] = row["reference_fb_s"] / row["closed_fb_s"]
    return row


def fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'C':>5} {'d':>5} {'dtype':>7} | {'svd s':>8} {'closed fb s':>11} {'fwd s':>8} {'x svd':>6} "
            f"{'MB rss/model':>13} | {'riem fb s':>9} {'it':>3} | {'ref fb s':>9} {'ref/closed':>10} {'ref MB rss/model':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['C']:>5} {r['d']:>5} {r['dtype']:>7} | {fmt(r['svd_s']):>8} {fmt(r['closed_fb_s']):>11} "
              f"{fmt(r['closed_fwd_s']):>8} {fmt(r['ratio_closed_to_svd'], '.2f'):>6} "
              f"{fmt(r['closed_mem_mb'], '.0f') + '/' + fmt(r['closed_model_mb'], '.0f'):>13} | "
              f"{fmt(r['riemannian_fb_s']):>9} {str(r['riemannian_iterations']):>3} | "
              f"{fmt(r.get('reference_fb_s'), '.3f'):>9} {fmt(r.get('ratio_reference_to_closed'), '.0f'):>10} "
              f"{fmt(r.get('reference_mem_mb'), '.0f') + '/' + fmt(r['reference_model_mb'], '.0f'):>17}")
    for r in rows:
        if r.get("reference_skipped"):
            print(f"  reference skipped at C={r['C']}, d={r['d']}, {r['dtype']}: {r['reference_skipped']}")


def check_targets(rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        ok = r["ratio_closed_to_svd"] <= 3.0
        notes.append(f"C={r['C']:>4} d={r['d']:>4} {r['dtype']}: closed fwd+bwd = {r['ratio_closed_to_svd']:.2f} x SVD "
                     f"({'meets' if ok else 'MISSES'} <= 3x)")
        if (r["C"], r["d"]) == (1000, 2048):
            ok1 = r["closed_fb_s"] < 1.0
            notes.append(f"           C=1000 d=2048 {r['dtype']}: {r['closed_fb_s']:.3f} s "
                         f"({'meets' if ok1 else 'MISSES'} < 1 s)")
    return notes


def resnet18_share(batch: int, repeats: int, image: int = 32) -> dict:
    """The node's share of one ResNet18 training step (CIFAR10: C = 10, d = 512, CIFAR stem, full width):
    best time of a step (forward, backward, SGD update) with Markou's implicit ETF head, and of the node's
    forward + backward on that step's (d x C) feature means; share = node / step."""
    from nc_lib.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, head="implicit_etf", input_shape=(3, image, image))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image, image)
    y = torch.arange(10).repeat(batch // 10 + 1)[:batch]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model.head(model.body(x), y), y).backward()
        opt.step()

    step_s, _ = best_time(step, max(2, repeats // 2), budget_s=120.0, min_s=0.0)
    inp = make_inputs(10, 512, torch.float32)

    def node() -> None:
        nearest_etf_node(inp["Hbar"].clone().requires_grad_(), inp["U_prox"], 1e-3)[0].backward(inp["G"])

    node_s, _ = best_time(node, repeats)
    return {"batch": batch, "image": image, "step_s": step_s, "node_s": node_s, "share": node_s / step_s}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only (C, d) = (10, 512) and (100, 512)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (best is kept)")
    ap.add_argument("--no-reference", action="store_true", help="skip the Riemannian + dense KKT reference")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results")
    ap.add_argument("--resnet-batch", type=int, default=64, help="batch of the ResNet18 step (0: skip it)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        raise ValueError("--threads and --repeats must be >= 1.")
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    # a call per dtype first: the node loads SciPy's LAPACK wrapper on first use, and the first
    # float32/float64 products page in their BLAS kernels and buffers; neither belongs to a size's row
    for dtype in DTYPES.values():
        warm = make_inputs(*sizes[0], dtype)
        nearest_etf_node(warm["Hbar"].clone().requires_grad_(), warm["U_prox"], 1e-3)[0].backward(warm["G"])
    rates = {k: gemm_rate(v) for k, v in DTYPES.items()}
    rows = []
    for C, d in sizes:
        for name in DTYPES:
            rows.append(run_case(C, d, name, args.repeats, not args.no_reference, rates[name]))
            print(f"done C={C} d={d} {name}", flush=True)
    print()
    print_table(rows)
    notes = check_targets(rows)
    print()
    print("\n".join(notes))
    share = resnet18_share(args.resnet_batch, args.repeats) if args.resnet_batch > 0 else None
    if share:
        print(f"\nResNet18 training step (batch {share['batch']}, {share['image']}x{share['image']}, implicit ETF head): "
              f"{share['step_s']:.3f} s; the node's forward + backward {1e3 * share['node_s']:.3f} ms = "
              f"{100 * share['share']:.3f}% of the step")
    out = {
        "benchmark": "nearest_etf",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gemm_gflops": {k: v / 1e9 for k, v in rates.items()},
        "quick": args.quick,
        "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
        "targets": notes,
        "resnet18_step": share,
    }
    path = args.json or RESULTS / ("nearest_etf_quick.json" if args.quick else "nearest_etf.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
