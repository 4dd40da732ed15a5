"""Benchmark of the training engine: throughput and measurement overhead.

- Training throughput (images/s, one SGD step = forward + backward + update, batch 128) of
  ResNet18 with the CIFAR stem on 3x32x32 inputs and of the MLP (3 hidden layers of 512, batch
  norm) on 1x28x28 inputs.
- Measurement overhead at Papyan's schedule: the collapse measurement of :func:`nc_lib.features.measure`
  (one eval pass over the training set streamed into the CollapseAccumulator, one over the test
  set) timed against a training epoch on the same data, both through the real loaders, and
  scaled to Papyan's schedule: overhead = 50 x T_measure / (350 x T_epoch). The test set is 1/5 of
  the training set, as in CIFAR10. Must be < 10%.

Usage: ``python benchmarks/bench_train.py [--device auto|cpu|cuda] [--n-train 1280] [--steps 5] [--json out.json]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nc_lib.data import ArrayDataset, make_loader  # noqa: E402
from nc_lib.models import build_model  # noqa: E402
from nc_lib.config import PAPYAN_EPOCHS, resolve_device  # noqa: E402
from nc_lib.features import measure  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fake_set(n: int, shape: tuple[int, ...], C: int = 10, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % C
    return ArrayDataset(raw, y, num_classes=C, mean=torch.full(shape, 0.5), std=torch.full(shape, 0.29), scale=255.0,
                        name="bench", split="train")


def _model(name: str, shape: tuple[int, ...], device: torch.device) -> torch.nn.Module:
    kw = {"input_shape": shape} if name == "mlp" else {"in_channels": shape[0]}
    return build_model(name, num_classes=10, **kw).to(device)


def _train_epoch(model, loader, opt, device, amp: bool) -> float:
    model.train()
    ce = torch.nn.CrossEntropyLoss()
    _sync(device)
    t = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = ce(model(x).float(), y)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t


def bench(name: str, shape: tuple[int, ...], device: torch.device, n_train: int, amp: bool = False,
          repeats: int = 2) -> dict[str, float]:
    torch.manual_seed(0)
    model = _model(name, shape, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    train = _fake_set(n_train, shape)
    test = _fake_set(max(10, n_train // 5), shape, seed=1)
    pin = device.type == "cuda"
    loader = make_loader(train, 128, shuffle=True, seed=0, pin_memory=pin)
    eval_train = make_loader(train, 512, pin_memory=pin)
    eval_test = make_loader(test, 512, pin_memory=pin)
    # warm-up (cudnn autotune, allocator, first-call overheads)
    warm = make_loader(_fake_set(256, shape, seed=2), 128, shuffle=True, seed=0)
    _train_epoch(model, warm, opt, device, amp)
    measure(model, make_loader(_fake_set(20, shape, seed=3), 512), None, 10, device, amp=amp)
    t_epoch = min(_train_epoch(model, loader, opt, device, amp) for _ in range(repeats))
    t_meas = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        measure(model, eval_train, eval_test, 10, device, amp=amp)
        _sync(device)
        t_meas.append(time.perf_counter() - t)
    t_measure = min(t_meas)
    overhead = len(PAPYAN_EPOCHS) * t_measure / (PAPYAN_EPOCHS[-1] * t_epoch)
    return {"model": name, "input_shape": list(shape), "device": str(device), "amp": amp, "n_train": n_train,
            "train_images_per_s": n_train / t_epoch, "epoch_s": t_epoch, "measure_s": t_measure,
            "measure_over_epoch": t_measure / t_epoch, "papyan_overhead": overhead}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--n-train", type=int, default=None, help="training images per timed epoch "
                   "(default 1280 on CPU, 20480 on GPU)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on GPU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n = args.n_train or (20480 if device.type == "cuda" else 1280)
    results = [bench("resnet18", (3, 32, 32), device, n, args.amp),
               bench("mlp", (1, 28, 28), device, max(n, 12800), args.amp)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}")
    print(f"{'model':10s} {'img/s':>10s} {'epoch s':>9s} {'measure s':>10s} {'meas/epoch':>10s} {'Papyan overhead':>16s}")
    for r in results:
        print(f"{r['model']:10s} {r['train_images_per_s']:10.0f} {r['epoch_s']:9.2f} {r['measure_s']:10.2f} "
              f"{r['measure_over_epoch']:10.3f} {100 * r['papyan_overhead']:15.2f}%")
    ok = all(r["papyan_overhead"] < 0.10 for r in results)
    print("measurement overhead < 10% of training at Papyan's schedule:", "yes" if ok else "NO")
    if args.json:
        Path(args.json).write_text(json.dumps({"device_name": name, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
