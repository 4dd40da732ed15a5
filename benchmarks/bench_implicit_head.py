"""What the implicit ETF head costs per training step against a standard linear head: dispatches, host syncs, time.

Markou et al. (2024)'s implicit ETF head (:class:`nc_lib.heads.ImplicitETFHead`) solves a C x C problem at every
step. On a GPU that algebra is a few microseconds of arithmetic in dozens of tiny kernels, and every host
synchronisation (``.item()``, ``bool(tensor)``, ``.cpu()``, a LAPACK error check) drains the launch queue: the
step becomes launch- and sync-bound (issue 16 section 3: a ResNet18 epoch on an H100 took 3.8 s with it against
2.9 s with a linear head). This benchmark measures the proxies a CPU can measure, per training step of the head
alone (forward, cross-entropy and backward on a batch of features ``h``, B = 128, d = 512, C in (10, 100), ``h``
a leaf that requires grad), for the implicit head and for :class:`~nc_lib.heads.LinearHead` in the same run:

* ``top ops``: top-level aten ops (``torch.profiler``, CPU activity: events named ``aten::*`` whose parent is not
  an aten op), the number of dispatches, each at most a kernel launch or a few on a GPU (views launch none);
  ``all ops``: every aten event. The fused step's host solve for C > ``nearest_etf.FUSED_NUMPY_MAX_C`` runs on
  CPU tensors wherever the head runs: its ops are counted apart (``host ops``).
* ``syncs``: host synchronisations, each a wait for the GPU's queue there: ``aten::_local_scalar_dense`` events
  (``.item()``, ``bool``/``int``/``float`` of a tensor, and the error checks inside ``torch.linalg`` factorisations)
  outside the host solve, plus Python calls of ``cpu``, ``tolist``, ``numpy(force=True)`` and a blocking
  ``to("cpu")`` on a tensor.
* ``cpu x linear``: CPU time per step, implicit / linear (median over back-to-back pairs of steps, which see the
  same load; ``--pairs``).
* On CUDA (when available): the GPU time per step of the head alone (implicit / linear, with
  ``torch.cuda.synchronize`` around the timed steps) and of a ResNet18 training step (CIFAR shapes, batch 128,
  SGD): the target is the ResNet18 step with the implicit head at most 1.05 x the linear head's.

Rows: ``implicit``, the head as it runs here; ``implicit_fused``, its fused step (``fused_step = True``), the
route a GPU takes (on the CPU, the head takes it while d C^2 <= ``nearest_etf.NUMPY_MAX_WORK``);
``implicit_general``, its general route (``fused_step = False``) with ``nearest_etf.NUMPY_MAX_WORK = 0`` so that
the node takes its torch route: what a GPU ran before the fused step. Targets (against the linear head of the
same run, never absolute times): one host sync per step (the read-back of the Gram whose C x C algebra runs on
the host); top-level ops as few as the algebra allows. ``tests/test_implicit_head_ops.py`` guards the counts.

Measured on the development machine (2 CPU cores shared with training runs, ``--threads 1``, torch 2.14.1; CPU
times +-30% from run to run), ``--pairs 200``; "before" is this benchmark run against the code of commit 3edfd3e
(see ``docs/results/implicit_head_ops.md``):

    C    row                         top ops        syncs      cpu x linear
                                  before  after  before after  before  after
    10   linear                       16     16      0     0       1      1
    10   implicit (this CPU)         138     71      8     1     5.4    4.7
    10   implicit_fused (GPU route)  179     71      9     1     5.9    4.7
    10   implicit_general            179    177      9     7     5.9    5.4
    100  implicit_fused (GPU route)  179     69      9     1     7.1    9.5   (+203 host-solve ops, CPU tensors)
    100  implicit_general (this CPU) 179    177      9     7     6.9    7.2

Usage::

    .venv/bin/python benchmarks/bench_implicit_head.py [--threads 1] [--pairs 200] [--sizes 10 100] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nc_lib.nearest_etf as ne  # noqa: E402
from nc_lib.heads import ImplicitETFHead, LinearHead  # noqa: E402

SIZES = (10, 100)
FEATURE_DIM = 512
BATCH = 128
ROWS = ("implicit", "implicit_fused", "implicit_general")
_COPIES = ("numpy", "tolist", "cpu", "to")


# --------------------------------------------------------------------------- counting
class SyncCounter:
    """Counts, while active, the Python calls that copy a tensor to the host and wait for it: ``cpu``,
    ``tolist``, ``numpy(force=True)`` and a blocking ``to`` a CPU device (``numpy()`` without ``force`` works on a
    host tensor only; an upload with ``non_blocking=True`` does not wait). Wraps those methods of ``torch.Tensor``,
    so that the backward (run by the autograd engine) is counted too. ``item``, ``bool``, ``int`` and ``float`` of a
    tensor are counted by the profiler (``aten::_local_scalar_dense``), not here."""

    def __enter__(self) -> "SyncCounter":
        self.calls: dict[str, int] = {}
        self._saved = {name: getattr(torch.Tensor, name) for name in _COPIES}

        def wrap(name: str, orig: Callable) -> Callable:
            def counted(t, *args, **kw):
                if _waits(name, args, kw):
                    self.calls[name] = self.calls.get(name, 0) + 1
                return orig(t, *args, **kw)
            return counted

        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, wrap(name, orig))
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _waits(name: str, args: tuple, kw: dict) -> bool:
    if name in ("cpu", "tolist"):
        return True
    if name == "numpy":
        return bool(kw.get("force", args[0] if args else False))
    if kw.get("non_blocking") or (len(args) > 1 and args[1] is True):
        return False
    dev = kw.get("device", args[0] if args else None)
    if isinstance(dev, str):
        return dev.split(":")[0] == "cpu"
    return isinstance(dev, torch.device) and dev.type == "cpu"


def _step(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> None:
    out = head(h, y) if getattr(head, "needs_labels", False) else head(h)
    F.cross_entropy(out, y).backward()
    h.grad = None


def _under(event, name: str) -> bool:
    p = event.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


def count_step(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, warmup: int = 3) -> dict[str, int]:
    """Aten ops and host syncs of one training step of ``head`` on ``(h, y)`` (after ``warmup`` steps)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        _step(head, h, y)
    with SyncCounter() as sc, profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(head, h, y)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    host_range = getattr(ne, "HOST_SOLVE_RANGE", None)  # (absent before the fused step: run against older code)
    host = [e for e in events if _under(e, host_range)]
    events = [e for e in events if not _under(e, host_range)]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    scalar = sum(e.name == "aten::_local_scalar_dense" for e in events)
    return {"top_ops": len(top), "all_ops": len(events), "syncs": scalar + sc.total, "scalar_reads": scalar,
            "host_copies": sc.total, "host_ops": len(host)}


@contextmanager
def route(name: str) -> Iterator[Callable[[torch.nn.Module], torch.nn.Module]]:
    """How the implicit head runs in row ``name`` (see the module docstring); yields a function that sets a head up."""
    old = ne.NUMPY_MAX_WORK
    if name == "implicit_general":
        ne.NUMPY_MAX_WORK = 0
    fused = {"implicit": None, "implicit_fused": True, "implicit_general": False}[name]

    def setup(head: torch.nn.Module) -> torch.nn.Module:
        head.fused_step = fused
        return head
    try:
        yield setup
    finally:
        ne.NUMPY_MAX_WORK = old


def inputs(C: int, d: int = FEATURE_DIM, B: int = BATCH,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of features (a leaf that requires grad) and labels with every class."""
    g = torch.Generator().manual_seed(C)
    return torch.randn(B, d, generator=g).to(device).requires_grad_(), (torch.arange(B) % C).to(device)


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ratio(step: Callable[[], None], ref: Callable[[], None], device: torch.device, pairs: int,
               warmup: int = 5, inner: int = 1) -> dict[str, float]:
    """Median over ``pairs`` back-to-back pairs (``inner`` calls of ``step``, then as many of ``ref``) of the ratio
    of their times, and the median times per call."""
    for _ in range(warmup):
        step()
        ref()
    ratios, ts, rs = [], [], []
    for _ in range(pairs):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(inner):
            ref()
        _sync(device)
        t2 = time.perf_counter()
        ts.append((t1 - t0) / inner)
        rs.append((t2 - t1) / inner)
        ratios.append((t1 - t0) / (t2 - t1))
    return {"ratio": statistics.median(ratios), "step_s": statistics.median(ts), "ref_step_s": statistics.median(rs)}


def _head_step(head: torch.nn.Module, C: int, d: int, B: int, device: torch.device) -> Callable[[], None]:
    h, y = inputs(C, d, B, device)
    head = head.to(device)
    return lambda: _step(head, h, y)


def _resnet_step(head_name: str, device: torch.device, C: int = 10, B: int = 128) -> Callable[[], None]:
    from nc_lib.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=C, head=head_name).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(B, 3, 32, 32, device=device)
    y = (torch.arange(B) % C).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, y), y).backward()  # the model passes y to a head that needs labels
        opt.step()
    return step


# --------------------------------------------------------------------------- main
def run(sizes=SIZES, d: int = FEATURE_DIM, B: int = BATCH, pairs: int = 200, cuda: bool | None = None,
        resnet_pairs: int = 20) -> dict:
    cpu = torch.device("cpu")
    rows = []
    for C in sizes:
        linear = {"C": C, "row": "linear", **count_step(LinearHead(d, C), *inputs(C, d, B)), "cpu_ratio": 1.0}
        rows.append(linear)
        refs = []
        for row in ROWS:
            with route(row) as setup:
                cnt = count_step(setup(ImplicitETFHead(d, C)), *inputs(C, d, B))
                t = time_ratio(_head_step(setup(ImplicitETFHead(d, C)), C, d, B, cpu),
                               _head_step(LinearHead(d, C), C, d, B, cpu), cpu, pairs)
            rows.append({"C": C, "row": row, **cnt, "cpu_ratio": t["ratio"], "cpu_step_s": t["step_s"],
                         "linear_cpu_step_s": t["ref_step_s"]})
            refs.append(t["ref_step_s"])
        linear["cpu_step_s"] = statistics.median(refs)
    out: dict = {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__, "d": d, "B": B}
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        dev = torch.device("cuda")
        gpu = []
        for C in sizes:
            t = time_ratio(_head_step(ImplicitETFHead(d, C), C, d, B, dev),  # the fused step, as on any GPU
                           _head_step(LinearHead(d, C), C, d, B, dev), dev, pairs, inner=10)
            gpu.append({"C": C, "head_gpu_ratio": t["ratio"], "head_gpu_step_s": t["step_s"],
                        "linear_gpu_step_s": t["ref_step_s"]})
        t = time_ratio(_resnet_step("implicit_etf", dev), _resnet_step("linear", dev), dev, resnet_pairs, inner=5)
        out["gpu"] = {"device_name": torch.cuda.get_device_name(dev), "heads": gpu, "resnet18_ratio": t["ratio"],
                      "resnet18_implicit_step_s": t["step_s"], "resnet18_linear_step_s": t["ref_step_s"],
                      "target_resnet18_ratio": 1.05}
    return out


def report(out: dict) -> None:
    print(f"per training step of the head (B={out['B']}, d={out['d']}); torch {out['torch']}, "
          f"{out['threads']} thread(s)")
    print(f"{'C':>4s} {'row':18s} {'top ops':>8s} {'all ops':>8s} {'syncs':>6s} {'host ops':>9s} "
          f"{'cpu x linear':>13s} {'cpu us':>8s}")
    for r in out["rows"]:
        us = 1e6 * r["cpu_step_s"]
        print(f"{r['C']:4d} {r['row']:18s} {r['top_ops']:8d} {r['all_ops']:8d} {r['syncs']:6d} {r['host_ops']:9d} "
              f"{r['cpu_ratio']:13.2f} {us:8.0f}")
    if "gpu" in out:
        g = out["gpu"]
        print(f"GPU {g['device_name']}:")
        for r in g["heads"]:
            print(f"  C={r['C']}: head step {1e6 * r['head_gpu_step_s']:.0f} us, {r['head_gpu_ratio']:.2f} x linear")
        ok = g["resnet18_ratio"] <= g["target_resnet18_ratio"]
        print(f"  ResNet18 step (C=10, batch 128): {g['resnet18_ratio']:.3f} x linear "
              f"(target <= {g['target_resnet18_ratio']}: {'yes' if ok else 'NO'})")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=200, help="back-to-back pairs of steps timed per row")
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), help="numbers of classes C")
    p.add_argument("--dim", type=int, default=FEATURE_DIM, help="feature dimension d")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--no-cuda", action="store_true", help="skip the GPU timings even where CUDA is available")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = run(tuple(a.sizes), d=a.dim, B=a.batch, pairs=a.pairs, cuda=False if a.no_cuda else None)
    report(out)
    if a.json:
        from nc_lib.atomic_io import atomic_write_json

        atomic_write_json(Path(a.json), out)
    return out


if __name__ == "__main__":
    main()
