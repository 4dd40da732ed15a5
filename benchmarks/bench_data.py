"""Training throughput from device-resident data against the DataLoader path, side by side (issue 16, section 1).

Two paths serve the same augmented CIFAR-shaped batches (3 x 32 x 32 uint8, pad-4 crop + flip, batch 128,
order a function of (seed, epoch)):
  dataloader  the path before issue 16: the CPU-resident ArrayDataset through make_loader (pinned on a GPU),
              the crop + flip looped over the images in Python, each batch copied to the device
  device      ArrayDataset.to(device): the raw uint8 array held on the device, each batch indexed,
              standardised and augmented there, batched (on a CPU this differs only by the batched crop)
For each of the MLP (3 x 512, batch norm) and ResNet18 (CIFAR stem) it reports images/s of one SGD epoch
(forward, backward, update) and of the data path alone (no model), best of ``--repeats``.

Usage: python benchmarks/bench_data.py [--device auto|cpu|cuda] [--n-train N] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nc_lib import data as D  # noqa: E402
from nc_lib.config import resolve_device  # noqa: E402
from nc_lib.models import build_model  # noqa: E402

SHAPE = (3, 32, 32)


def per_image_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The crop + flip before issue 16: one Python iteration per image (same random draws)."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    offs = torch.randint(0, 2 * padding + 1, (B, 2))
    flips = torch.rand(B) < 0.5
    out = torch.empty_like(x)
    for i in range(B):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        crop = padded[i, :, dy:dy + H, dx:dx + W]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


class LoopCropDataset(D.ArrayDataset):
    """ArrayDataset with the former per-image augmentation loop (the reference path)."""

    def _prepare(self, raw: torch.Tensor) -> torch.Tensor:
        x = (raw.float() / self.scale - self.mean) / self.std
        return per_image_crop_flip(x) if self.augment else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dataset(cls, n: int) -> D.ArrayDataset:
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    return cls(raw, torch.arange(n) % 10, num_classes=10, mean=torch.full(SHAPE, 0.5), std=torch.full(SHAPE, 0.25),
               scale=255.0, augment=True, name="fake", split="train")


def _loaders(n: int, device: torch.device, batch: int) -> dict[str, object]:
    pin = device.type == "cuda"
    return {"dataloader": D.make_loader(_dataset(LoopCropDataset, n), batch, shuffle=True, seed=0, pin_memory=pin),
            "device": D.make_loader(_dataset(D.ArrayDataset, n).to(device), batch, shuffle=True, seed=0)}


def _epoch(loader, device: torch.device, step=None) -> float:
    _sync(device)
    t = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step is not None:
            step(x, y)
    _sync(device)
    return time.perf_counter() - t


def _step_fn(name: str, device: torch.device):
    torch.manual_seed(0)
    kw = {"input_shape": SHAPE} if name == "mlp" else {"in_channels": SHAPE[0]}
    model = build_model(name, num_classes=10, **kw).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    ce = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        ce(model(x), y).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--n-train", type=int, default=None, help="images per epoch (default 1280 on CPU, 50000 on GPU)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", default="data only,mlp,resnet18", help="comma-separated subset")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n = args.n_train or (50000 if device.type == "cuda" else 1280)
    loaders = _loaders(n, device, args.batch)
    results = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; {n} CIFAR-shaped images per epoch, batch {args.batch}, pad-4 crop + flip")
    print(f"{'model':10s} {'dataloader img/s':>17s} {'device img/s':>13s} {'speed-up':>9s}", flush=True)
    for model in args.models.split(","):
        row = {"model": model, "n_train": n, "batch": args.batch}
        for path, loader in loaders.items():
            step = None if model == "data only" else _step_fn(model, device)
            _epoch(loader, device, step)  # warm-up: allocator, cudnn autotune, first calls
            row[path] = n / min(_epoch(loader, device, step) for _ in range(args.repeats))
        results.append(row)
        r = row
        print(f"{r['model']:10s} {r['dataloader']:17.0f} {r['device']:13.0f} {r['device'] / r['dataloader']:8.2f}x",
              flush=True)
    if args.json:
        from nc_lib.atomic_io import atomic_write_json

        atomic_write_json(Path(args.json), {"device_name": name, "results": results})
    return results


if __name__ == "__main__":
    main()
