"""The memory of training, measured: the peak and the parameter, gradient and optimiser-state bytes of a few steps.

For Zhu et al. (2021)'s Table 1 (the memory a fixed ETF classifier with d = C saves).

On a GPU the peak is ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set (VmHWM) of a
fresh process (:func:`measure_training_memory`), so that every variant starts from the same state.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ...config import TrainConfig, build_run_model, load_run_data, resolve_device
from ...data import make_loader
from ...models import count_parameters
from ...train import _make_optimizer
from ...validation import check_int

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def training_loss(model: nn.Module, x: Tensor, y: Tensor, feature_decay: float = 0.0) -> tuple[Tensor, Tensor]:
    """The engine's per-batch objective: CE(W h + b, y) + lambda_H/2 mean_i ||h_i||^2 on the raw
    features h = body(x) (the same formula as :func:`nc_lib.train.train`). Returns (loss, h)."""
    h = model.body(x)
    loss = nn.functional.cross_entropy(model.head(h), y)
    if feature_decay > 0:
        loss = loss + 0.5 * feature_decay * h.pow(2).sum(1).mean()
    return loss, h


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of trainable parameters, of their gradients and of the optimiser's state tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    g_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    s_bytes = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                  if isinstance(v, Tensor) and v.dim() > 0)
    return {"param_bytes": p_bytes, "grad_bytes": g_bytes, "optimizer_state_bytes": s_bytes,
            "param_grad_state_bytes": p_bytes + g_bytes + s_bytes}


def measure_training_memory_inprocess(config: TrainConfig, steps: int = 3) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps of ``config`` at its batch size, in this process.

    The model and optimiser are built exactly as the engine builds them (:func:`nc_lib.config.build_run_model`,
    ``nc_lib.train._make_optimizer``); the loss is :func:`training_loss`. GPU: ``torch.cuda.max_memory_allocated``
    after ``reset_peak_memory_stats`` (everything the model, activations, gradients and optimiser
    allocate). CPU: peak resident set size VmHWM (after ``echo 5 > /proc/self/clear_refs`` resets it
    to the current RSS, once the data batches are in memory and before the model is built) minus
    the RSS at that reset. Only meaningful in a fresh process: use :func:`measure_training_memory`.
    """
    steps = check_int("steps", steps, 1)
    device = resolve_device(config.device)
    train_set, _ = load_run_data(config)
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed,
                         drop_last=len(train_set) >= config.batch_size)
    batches = []
    for x, y in loader:
        batches.append((x.to(device), y.to(device)))
        if len(batches) == steps:
            break
    while len(batches) < steps:  # a dataset smaller than steps batches: repeat
        batches.append(batches[len(batches) % max(1, len(batches))])
    info = {"num_classes": train_set.num_classes, "input_shape": list(train_set.input_shape)}
    cuda = device.type == "cuda"

    def run_steps(n: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(config.seed)
        model = build_run_model(config, device, info).train()
        opt = _make_optimizer(config, model)
        head_wd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
        for x, y in batches[:n]:
            if config.optimizer == "lbfgs":
                def closure() -> Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss, _ = training_loss(model, x, y, config.feature_decay)
                    reg = sum(p.pow(2).sum() for p in model.body.parameters() if p.requires_grad) * config.weight_decay \
                        + sum(p.pow(2).sum() for p in model.head.parameters() if p.requires_grad) * head_wd
                    loss = loss + 0.5 * reg
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.zero_grad(set_to_none=True)
                loss, _ = training_loss(model, x, y, config.feature_decay)
                loss.backward()
                opt.step()
        return model, opt

    # warm-up: the first step loads kernels, thread pools and library pages (the same for every
    # variant); then everything is freed and the measured run starts from that state
    model, opt = run_steps(1)
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base_rss = _status_kib("VmRSS")
        reset = _reset_peak_rss()
    model, opt = run_steps(steps)
    out: dict[str, Any] = {"device": str(device), "batch_size": config.batch_size, "steps": steps,
                           "trainable_parameters": count_parameters(model)}
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
        out["method"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_bytes"] = int((_status_kib("VmHWM") - base_rss) * 1024)
        out["process_peak_bytes"] = int(_status_kib("VmHWM") * 1024)
        out["method"] = "VmHWM - RSS before the model" + ("" if reset else " (clear_refs unavailable: peak since start)")
    out.update(state_bytes(model, opt))
    return out


def measure_training_memory(config: TrainConfig, steps: int = 3, *, threads: int = 1) -> dict[str, Any]:
    """:func:`measure_training_memory_inprocess` in a fresh Python process, so every variant is
    measured from the same starting state (no allocator caches or earlier peaks). ``threads``:
    torch threads in that process (intra-op buffers depend on it; keep it equal across variants)."""
    code = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[2])); "
            "from nc_lib.papers.zhu2021 import measure_training_memory_inprocess as m; "
            "from nc_lib.config import TrainConfig; "
            "print('@@' + json.dumps(m(TrainConfig.from_dict(json.loads(sys.argv[1])), int(sys.argv[3]))))")
    # a fixed mmap threshold: glibc serves every block of 64 KiB or more with its own mapping and
    # returns it on free, so the resident set follows the live tensors (no dynamic threshold)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config.to_dict()), str(int(threads)), str(int(steps))],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])
