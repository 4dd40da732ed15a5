"""Benchmark the UFM trainer: UFM-10 (the < 10 s target) and UFM-1000 (must run).

    .venv/bin/python benchmarks/bench_ufm.py            # full: UFM-10 2,000 steps, UFM-1000 60 steps
    .venv/bin/python benchmarks/bench_ufm.py --quick    # smoke test (a few seconds)

Prints a table and writes ``benchmarks/results/ufm.json`` (``--out`` to change). Times are wall
clock of the ``train_ufm`` call (imports and the first-call warm-up excluded), split into the
optimiser steps and the measurements (every ``measure_every`` steps: every collapse metric and
a snapshot). The machine's other load is not controlled: read the numbers as indicative.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nc_lib.ufm import UFMConfig, start_ufm, train_ufm  # noqa: E402
from nc_lib.ufm_theory import ufm_optimal_objective  # noqa: E402


def bench(name: str, cfg: UFMConfig, steps: int, measure_every: int) -> dict:
    train_ufm(UFMConfig(num_classes=3, n_per_class=2, feature_dim=2), 2, 1, progress=False)  # warm-up
    hist = start_ufm(cfg)
    t0 = time.perf_counter()
    measure_time = [0.0]

    def timed_measure(orig=hist.measure):
        t = time.perf_counter()
        out = orig()
        measure_time[0] += time.perf_counter() - t
        return out

    hist.measure = timed_measure  # type: ignore[method-assign]
    train_ufm(None, steps, measure_every, history=hist, progress=False)
    total = time.perf_counter() - t0
    last = hist.last
    n_meas = len(hist.records)
    f_star = ufm_optimal_objective(cfg.num_classes, cfg.counts()[0], cfg.lambda_W, cfg.lambda_H)
    return {
        "name": name, "C": cfg.num_classes, "n_per_class": cfg.counts()[0], "d": cfg.feature_dim,
        "N": cfg.num_samples, "optimizer": cfg.optimizer, "lr": cfg.learning_rate, "steps": steps,
        "measure_every": measure_every, "measurements": n_meas, "total_s": round(total, 3),
        "steps_s": round(total - measure_time[0], 3), "measure_s": round(measure_time[0], 3),
        "ms_per_step": round(1e3 * (total - measure_time[0]) / steps, 3),
        "ms_per_measurement": round(1e3 * measure_time[0] / max(n_meas, 1), 2),
        "final_objective": last["objective"], "theorem_objective": f_star,
        "objective_rel_gap": (last["objective"] - f_star) / f_star, "accuracy": last["accuracy"],
        "NC1": last["within_class_variability"], "NC2": last["classifier_etf_distance"],
        "NC3": last["classifier_means_alignment"],
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: few steps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ufm.json"))
    ap.add_argument("--ufm1000-n", type=int, default=5, help="features per class for UFM-1000 (default 5: N = 5,000)")
    ap.add_argument("--ufm1000-steps", type=int, default=60)
    args = ap.parse_args(argv)
    rows = []
    steps10 = 200 if args.quick else 2000
    rows.append(bench("UFM-10", UFMConfig(num_classes=10, n_per_class=100, feature_dim=512), steps10, 20))
    steps1000 = 5 if args.quick else args.ufm1000_steps
    rows.append(bench("UFM-1000", UFMConfig(num_classes=1000, n_per_class=args.ufm1000_n, feature_dim=1024),
                      steps1000, 5 if args.quick else 20))
    cols = ["name", "N", "d", "steps", "measurements", "total_s", "ms_per_step", "ms_per_measurement",
            "objective_rel_gap", "NC1", "NC2", "peak_rss_MiB"]
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>18.4g}" if isinstance(r[c], float) else f"{r[c]!s:>18}" for c in cols))
    if not args.quick:
        ok = rows[0]["total_s"] < 10
        print(f"UFM-10 target (< 10 s for 2,000 steps measured every 20): {'met' if ok else 'NOT met'} "
              f"({rows[0]['total_s']:.2f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"load average (1, 5, 15 min): {meta['load_average_1_5_15min']} on {os.cpu_count()} cores")
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
