"""Getting features out of a model: the hook on its head, the streaming passes, the collapse measurement.

Every measurement of a network reads its penultimate features h, the input of ``model.head``. A
:class:`FeatureTap` (a forward hook on the head) keeps them for each batch, so one forward pass gives
the logits and h together, and the passes here stream them batch by batch into
:class:`nc_lib.metrics.CollapseAccumulator` and its per-sample passes: no N x p matrix is ever held.

* :func:`measure`: every collapse measurement of a model on an (un-augmented) training loader and a
  test loader (Papyan, Han & Donoho 2020, REFERENCE.md section 2): training loss, accuracy and the
  collapse measurements; optionally a second training pass for the per-sample ones (NCC mismatch,
  cosine margins); on the test set loss, accuracy, NCC mismatch, NCC accuracy and cosine margins
  against the *training* class means (keys ``*_test``). With a :class:`MeasureReduce` each pass is
  combined across data-parallel ranks (:mod:`nc_lib.distributed`).
* :func:`snapshot_indices`, :func:`snapshot_features`: the fixed sample of training images whose
  features a run keeps at each measurement, for the collapse animation.
* :func:`autocast`: the mixed-precision context of a forward pass (bfloat16 on CUDA with ``amp``).

Precision: features, logits and the classifier stay float64 for float64 models and are float32
otherwise; running sums are float64, kept on the device (no host synchronisation per batch).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from .metrics import CollapseAccumulator, SampleAccumulator
from .models import Classifier


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp``; otherwise a disabled autocast (full precision)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class FeatureTap:
    """Forward hook that keeps the features of the latest forward pass; use as a context manager.

    By default it hooks ``model.head`` and keeps the head's input (the penultimate features). With
    ``module`` it hooks that module of any network instead, keeping its input (``output=False``) or
    its output (``output=True``; the first tensor of a tuple output), passed through ``transform``
    when given (e.g. pooling a convolutional map, see :mod:`nc_lib.measure_model`)."""

    def __init__(self, model: nn.Module, module: nn.Module | None = None, *, output: bool = False,
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.model = model
        self.module = model.head if module is None else module
        self.output = output
        self.transform = transform
        self.features: Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
        t = output if self.output else inputs[0]
        if isinstance(t, (tuple, list)):
            t = t[0]
        t = t.detach()
        self.features = t if self.transform is None else self.transform(t)

    def __enter__(self) -> "FeatureTap":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None


class MeasureReduce(NamedTuple):
    """How :func:`measure` combines its passes across data-parallel ranks (see
    :func:`nc_lib.distributed.measure_distributed`); without one, each process measures alone.

    ``sums(t)``: all-reduce the float64 running sums ``[loss sum, correct, n]`` of a pass;
    ``accumulator(acc)``: merge the ranks' :class:`CollapseAccumulator` in place;
    ``sample_pass(sp)``: merge the ranks' :class:`SampleAccumulator` in place."""

    sums: Callable[[Tensor], Tensor]
    accumulator: Callable[[CollapseAccumulator], CollapseAccumulator]
    sample_pass: Callable[[SampleAccumulator], SampleAccumulator]


def _keep_precision(t: Tensor) -> Tensor:
    """float64 stays float64 (exact reductions of float64 models); lower precisions become float32."""
    return t if t.dtype == torch.float64 else t.float()


def _stream_pass(model: nn.Module, tap: FeatureTap, loader: Iterable, device: torch.device, amp: bool,
                 update: Callable[[Tensor, Tensor], Any], sums: Tensor | None = None) -> None:
    """One eval pass over ``loader``: per batch, the logits ``model(x)``, then ``update(h, y)`` with the
    penultimate features h from ``tap``; with ``sums`` (float64, 3 entries) also adds the summed
    cross-entropy, the number correct and the number of samples into it (on the device: no host
    synchronisation per batch)."""
    ce = nn.CrossEntropyLoss(reduction="sum")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        if sums is not None:
            logits = _keep_precision(logits)
            sums[0] += ce(logits, y).double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
        update(_keep_precision(tap.features), y)


@torch.no_grad()
def measure(model: Classifier, train_loader: Iterable, test_loader: Iterable | None, num_classes: int,
            device: torch.device, *, train_sample_pass: bool = False, amp: bool = False,
            reduce: MeasureReduce | None = None) -> tuple[dict[str, float], CollapseAccumulator]:
    """Every collapse measurement of ``model`` (eval mode) on the given (un-augmented) loaders.

    Pass 1 (train): features streamed from a forward hook on the head into a CollapseAccumulator,
    plus loss and accuracy. Optional pass 2 (train): per-sample measurements against the final
    means, and with them the within-class variability Tr(Sigma_W Sigma_B^+)/C from each batch's
    deviations from the class shifts projected on the final (C-1)-dim between-class subspace (N p C):
    pass 1 then keeps no p x p scatter (``keep_scatter=False``; without pass 2 it keeps one, N p^2). Pass 3 (test): loss, accuracy, NCC mismatch / accuracy and cosine margin against the
    training means (keys ``*_test``). Features, logits and the classifier stay float64 for float64
    models and are float32 otherwise. ``reduce``: combine each pass across data-parallel ranks
    (:class:`MeasureReduce`; the loaders then hold each rank's shard).
    """
    was_training = model.training
    model.eval()
    acc = CollapseAccumulator(num_classes, keep_scatter=not train_sample_pass)
    out: dict[str, float] = {}
    with FeatureTap(model) as tap:
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, n
        _stream_pass(model, tap, train_loader, device, amp, acc.update, sums)
        if reduce is not None:
            sums = reduce.sums(sums)
            acc = reduce.accumulator(acc)
        loss_sum, correct, n = float(sums[0]), float(sums[1]), float(sums[2])
        out["train_loss"] = loss_sum / n
        out["train_accuracy"] = correct / n
        out["train_error"] = 1.0 - correct / n
        W, b = model.head.classifier()
        W = _keep_precision(W)
        b = None if b is None else _keep_precision(b)
        out.update(acc.result(W, b))
        if train_sample_pass:
            sp = acc.sample_pass(W, b, within_class=True)
            _stream_pass(model, tap, train_loader, device, amp, sp.update)
            out.update((sp if reduce is None else reduce.sample_pass(sp)).result())
        if test_loader is not None:
            sp = acc.sample_pass(W, b)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            _stream_pass(model, tap, test_loader, device, amp, sp.update, sums)
            if reduce is not None:
                sums = reduce.sums(sums)
                sp = reduce.sample_pass(sp)
            out["test_loss"] = float(sums[0]) / float(sums[2])
            out.update(sp.result("_test"))
            out["test_accuracy"] = out["accuracy_test"]
            out["test_error"] = 1.0 - out["accuracy_test"]
    model.train(was_training)
    return out, acc


def snapshot_indices(targets: Tensor, per_class: int, num_classes: int, seed: int) -> Tensor:
    """The fixed sample of a run's snapshots: ``per_class`` training indices per class (at most 2000 in
    all), drawn by a permutation seeded from ``seed`` (the run's data seed)."""
    k = min(per_class, max(1, 2000 // num_classes))
    g = torch.Generator().manual_seed(int(seed) + 4242)
    perm = torch.randperm(len(targets), generator=g)
    return torch.cat([perm[targets[perm] == c][:k] for c in range(num_classes)])


@torch.no_grad()
def snapshot_features(model: Classifier, dataset: Any, idx: Tensor, device: torch.device, batch: int) -> Tensor:
    """The penultimate features (float32, CPU) of ``dataset[idx]`` in eval mode, ``batch`` samples at a time."""
    was = model.training
    model.eval()
    feats = []
    for s in range(0, len(idx), batch):
        part = idx[s:s + batch]
        if hasattr(dataset, "get_batch"):
            x, _ = dataset.get_batch(part)
        else:
            x = torch.stack([dataset[int(i)][0] for i in part])
        feats.append(model.features(x.to(device)).float().cpu())
    model.train(was)
    return torch.cat(feats) if feats else torch.empty(0)
