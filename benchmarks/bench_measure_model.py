"""Overhead of nc_lib.measure_model over a plain forward pass of the same loader.

torchvision ResNet18 (weights=None, 1-channel 28x28 input, Fashion-MNIST-sized: conv1 3x3 stride 1, no max
pool), random inputs with 10 balanced classes. Timed: (a) the plain forward passes over the loader that
measure_model makes (two over the training loader: the accumulator pass and the per-sample pass), in eval
mode under no_grad; (b) measure_model at the penultimate layer; (c) measure_model with layers="all".
Overhead = (b) / (a) - 1, target < 10% for (b). Median of ``--repeats`` timings.

    python benchmarks/bench_measure_model.py [--n 2048] [--batch 256] [--device auto] [--out results/x.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from nc_lib.any_model import measure_model
from nc_lib.atomic_io import atomic_write_json


def resnet18_28x28(num_classes: int = 10) -> nn.Module:
    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if a.device == "auto" else a.device))
    torch.manual_seed(0)
    model = resnet18_28x28().to(dev).eval()
    X = torch.randn(a.n, 1, 28, 28, device=dev)
    Y = (torch.arange(a.n) % 10).to(dev)
    loader = [(X[s:s + a.batch], Y[s:s + a.batch]) for s in range(0, a.n, a.batch)]

    def plain() -> None:
        with torch.no_grad():
            for _ in range(2):  # the two passes measure_model makes over the training loader
                for x, _ in loader:
                    model(x)
        _sync(dev)

    def timed(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(a.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_plain = timed(plain)
    t_pen = timed(lambda: measure_model(model, loader, num_classes=10, progress=False))
    t_all = timed(lambda: measure_model(model, loader, num_classes=10, layers="all", progress=False))
    res = {"device": str(dev), "n": a.n, "batch": a.batch, "plain_forward_2_passes_s": t_plain,
           "penultimate_s": t_pen, "penultimate_overhead": t_pen / t_plain - 1,
           "all_layers_s": t_all, "all_layers_overhead": t_all / t_plain - 1}
    for k, v in res.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
