"""Speed and memory of the collapse measurements against two straightforward references.

References (written here, as the public code does it):
  loop      per-sample Python loop for Sigma_W, then a p x p pinv(Sigma_B)   (the papers' own code)
  batchcov  batched covariance, R^T R per batch of centred features, then a p x p pinv
            (the fastest public NC library)
Ours:
  ours_nc1      nc_lib.metrics.within_class_variability, features in memory
  ours_stream   nc_lib.metrics.CollapseAccumulator over batches of 1024 (one pass, nothing N x p held)
  ours_full     nc_lib.metrics.measure_collapse with W and b: every measurement
  ours_2pass    the engine's streamed NC1 when it makes a second training pass (issue 16, section 4): a
                CollapseAccumulator without the p x p scatter (class sums only), then
                sample_pass(within_class=True) over the same batches: N p C instead of N p^2
  ours_2pass_full  the same two passes with W and b: every measurement, as nc_lib.features.measure makes them

Each method runs in its own process so its peak memory (RSS above the features) is its own.
Usage: python benchmarks/bench_metrics.py [--quick] [--repeat 5] [--sizes 1] [--methods ours_nc1,ours_2pass]
(best of the repeats: the first calls warm caches and thread pools)
Targets (2 cores): ours_nc1 >= 2x faster than batchcov at every size; ours_stream no slower than
batchcov; ours_full under 0.5 s, 3 s and 5 s; ours_2pass within 1.5x of ours_nc1 and ours_2pass_full
within 1.5x of ours_full (streamed at in-memory cost).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SIZES = [(50_000, 512, 10), (50_000, 2048, 100), (50_000, 2048, 1000)]
FULL_TARGETS = {10: 0.5, 100: 3.0, 1000: 5.0}
BATCH = 1024


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _features(N: int, p: int, C: int):
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.arange(C).repeat(N // C)[:N]
    means = torch.randn(C, p, generator=g)
    H = means[y] + 0.5 * torch.randn(N, p, generator=g)
    W = torch.randn(C, p, generator=g)
    b = torch.randn(C, generator=g)
    return H, y, W, b


def ref_loop(H, y, C):
    import torch

    N, p = H.shape
    mu = torch.zeros(C, p, dtype=torch.float64)
    for c in range(C):
        mu[c] = H[y == c].double().mean(0)
    Sw = torch.zeros(p, p, dtype=torch.float64)
    for i in range(N):  # as the papers' code: one outer product per sample
        r = H[i].double() - mu[y[i]]
        Sw += torch.outer(r, r)
    Sw /= N
    Mdot = mu - mu.mean(0)
    Sb = Mdot.T @ Mdot / C
    return float(torch.trace(Sw @ torch.linalg.pinv(Sb))) / C


def ref_batchcov(H, y, C):
    import torch

    N, p = H.shape
    sums = torch.zeros(C, p, dtype=torch.float64)
    for s in range(0, N, BATCH):
        sums.index_add_(0, y[s:s + BATCH], H[s:s + BATCH].double())
    mu = sums / torch.bincount(y, minlength=C)[:, None]
    mu32 = mu.float()
    Sw = torch.zeros(p, p, dtype=torch.float64)
    for s in range(0, N, BATCH):
        R = H[s:s + BATCH] - mu32[y[s:s + BATCH]]
        Sw += (R.T @ R).double()
    Sw /= N
    Mdot = mu - mu.mean(0)
    Sb = Mdot.T @ Mdot / C
    return float(torch.trace(Sw @ torch.linalg.pinv(Sb))) / C


def ours_nc1(H, y, C):
    from nc_lib.metrics import within_class_variability

    return within_class_variability(H, y, C)


def ours_stream(H, y, C):
    from nc_lib.metrics import CollapseAccumulator

    acc = CollapseAccumulator(C)
    for s in range(0, H.shape[0], BATCH):
        acc.update(H[s:s + BATCH], y[s:s + BATCH])
    return acc.result()["within_class_variability"]


def ours_full(H, y, C, W=None, b=None):
    from nc_lib.metrics import measure_collapse

    return measure_collapse(H, y, C, W, b)["within_class_variability"]


def ours_2pass(H, y, C, W=None, b=None):
    from nc_lib.metrics import CollapseAccumulator

    acc = CollapseAccumulator(C, keep_scatter=False)
    for s in range(0, H.shape[0], BATCH):
        acc.update(H[s:s + BATCH], y[s:s + BATCH])
    out = acc.result(W, b)
    sp = acc.sample_pass(W, b, within_class=True)
    for s in range(0, H.shape[0], BATCH):
        sp.update(H[s:s + BATCH], y[s:s + BATCH])
    out.update(sp.result())
    return out["within_class_variability"]


METHODS = {"loop": ref_loop, "batchcov": ref_batchcov, "ours_nc1": ours_nc1, "ours_stream": ours_stream,
           "ours_full": ours_full, "ours_2pass": ours_2pass, "ours_2pass_full": ours_2pass}
WITH_CLASSIFIER = ("ours_full", "ours_2pass_full")


def child(method: str, size: int, repeat: int) -> None:
    import torch

    N, p, C = SIZES[size]
    H, y, W, b = _features(N, p, C)
    fn = METHODS[method]
    args = (H, y, C, W, b) if method in WITH_CLASSIFIER else (H, y, C)
    import gc

    gc.collect()
    _reset_peak()
    base = _status_mb("VmRSS")
    times, value = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - t0)
    peak = _status_mb("VmHWM")
    print(json.dumps({"seconds": min(times), "value": value, "extra_mb": max(0.0, peak - base),
                      "threads": torch.get_num_threads()}))


def run(method: str, size: int, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(size), "--repeat", str(repeat)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only the smallest size, no loop reference")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--loop-all", action="store_true", help="also run the per-sample loop at p = 2048 (minutes)")
    parser.add_argument("--sizes", default=None, help="comma-separated indices into SIZES (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.repeat)
        return
    sizes = [0] if args.quick else range(len(SIZES))
    if args.sizes:
        sizes = [int(i) for i in args.sizes.split(",")]
    methods = list(METHODS) if not args.methods else args.methods.split(",")
    if args.methods and "batchcov" not in methods:
        methods.insert(0, "batchcov")  # the column every ratio is taken against
    results = []
    print(f"{'N, p, C':>20} {'method':>12} {'seconds':>9} {'extra MB':>9} {'vs batchcov':>12} {'value':>12}")
    for i in sizes:
        N, p, C = SIZES[i]
        row = {}
        for method in methods:
            if method == "loop" and (args.quick or (p > 512 and not args.loop_all)):
                continue  # the per-sample loop takes minutes at p = 2048 (64 s on an idle 2-core machine)
            r = run(method, i, 1 if method == "loop" else args.repeat)
            row[method] = r
        ref = row["batchcov"]["seconds"]
        for method, r in row.items():
            print(f"{f'{N}, {p}, {C}':>20} {method:>12} {r['seconds']:9.3f} {r['extra_mb']:9.0f} "
                  f"{ref / r['seconds']:11.2f}x {r['value']:12.6g}")
        checks = []
        if "ours_nc1" in row:
            checks.append(("nc1 >= 2x batchcov", ref / row["ours_nc1"]["seconds"] >= 2))
        if "ours_stream" in row:
            checks.append(("stream <= batchcov", row["ours_stream"]["seconds"] <= ref))
        if "ours_full" in row:
            checks.append((f"full set <= {FULL_TARGETS[C]} s", row["ours_full"]["seconds"] <= FULL_TARGETS[C]))
        for streamed, in_memory in (("ours_2pass", "ours_nc1"), ("ours_2pass_full", "ours_full")):
            if streamed in row and in_memory in row:
                ratio = row[streamed]["seconds"] / row[in_memory]["seconds"]
                checks.append((f"{streamed} <= 1.5x {in_memory} ({ratio:.2f}x)", ratio <= 1.5))
        print(f"{'':>20} targets: " + "; ".join(f"{name} {'OK' if ok else 'MISSED'}" for name, ok in checks))
        results.append({"N": N, "p": p, "C": C, **row})
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = "metrics_subset.json" if (args.sizes or args.methods) else "metrics.json"  # a subset keeps the full table
    (out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
