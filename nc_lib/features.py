"""Getting features out of a model: the hook on its head, the streaming passes, the collapse measurement.

Every measurement of a network reads its penultimate features h, the input of ``model.head``. A
:class:`FeatureTap` (a forward hook on the head) keeps them for each batch, so one forward pass gives
the logits and h together, and the passes here stream them batch by batch into
:class:`nc_lib.metrics.CollapseAccumulator` and its per-sample passes: no N x p matrix is ever held.

* :func:`measure_passes`: the passes that every measurement of a network shares (any tapped module,
  per-layer taps, any classifier), used by the engine's :func:`measure` and by
  :func:`nc_lib.any_model.measure_model`: every collapse measurement of a model on an (un-augmented) training loader and a
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

import contextlib
from typing import Any, Callable, Iterable, Mapping, NamedTuple

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


def _are_logits(out: Any, num_classes: int) -> bool:
    """Whether a model's output is a B x C logit matrix (so that loss and accuracy can be read off it)."""
    return isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] == num_classes


def _stream_pass(model: nn.Module, taps: Mapping[str, FeatureTap], loader: Iterable, device: torch.device,
                 amp: bool, updates: Mapping[str, Callable[[Tensor, Tensor], Any]], num_classes: int,
                 sums: Tensor | None = None) -> None:
    """One eval pass over ``loader``: per batch, the output ``model(x)``, then ``updates[k](h, y)`` with the
    features h that ``taps[k]`` caught; with ``sums`` (float64, 3 entries) also adds the summed
    cross-entropy, the number correct and the number of samples into it when the output is a B x C logit
    matrix (on the device: no host synchronisation per batch)."""
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        if sums is not None and _are_logits(logits, num_classes):
            logits = _keep_precision(logits)
            sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
        for key, update in updates.items():
            update(_keep_precision(taps[key].features), y)


ClassifierOf = Callable[[CollapseAccumulator], tuple[Tensor | None, Tensor | None]]


@torch.no_grad()
def measure_passes(model: nn.Module, train_loader: Iterable, test_loader: Iterable | None, num_classes: int,
                   device: torch.device, *, tap: FeatureTap, classifier: ClassifierOf,
                   layer_taps: Mapping[str, FeatureTap] | None = None, train_sample_pass: bool = True,
                   amp: bool = False, reduce: MeasureReduce | None = None,
                   ) -> tuple[dict[str, float], dict[str, dict[str, float]], CollapseAccumulator]:
    """The passes behind every collapse measurement of a network (the engine's :func:`measure` and
    :func:`nc_lib.any_model.measure_model`), in eval mode.

    Pass 1 (train): the features that ``tap`` (and each of ``layer_taps``) catches, streamed into a
    CollapseAccumulator per tap, plus loss and accuracy where the model's output is B x C logits. Then
    ``classifier(accumulator)`` gives (W, b) of the main features (or (None, None): features only).
    Optional pass 2 (train): per-sample measurements against the final means, and with them the
    within-class variability Tr(Sigma_W Sigma_B^+)/C from each batch's deviations from the class shifts
    projected on the final (C-1)-dim between-class subspace (N p C): pass 1 then keeps no p x p scatter
    (``keep_scatter=False``; without pass 2 it keeps one, N p^2). Pass 3 (test): loss, accuracy, NCC
    mismatch / accuracy and cosine margin against the training means (keys ``*_test``). ``reduce``:
    combine each pass across data-parallel ranks (:class:`MeasureReduce`; the loaders then hold each
    rank's shard). Returns (the main measurements, {layer: its feature-only measurements}, the main
    accumulator).
    """
    taps = {"": tap, **dict(layer_taps or {})}
    accs = {k: CollapseAccumulator(num_classes, keep_scatter=not train_sample_pass) for k in taps}
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            for t in taps.values():
                stack.enter_context(t)
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, n
            _stream_pass(model, taps, train_loader, device, amp, {k: a.update for k, a in accs.items()},
                         num_classes, sums)
            if reduce is not None:
                sums = reduce.sums(sums)
                accs = {k: reduce.accumulator(a) for k, a in accs.items()}
            if float(sums[2]) > 0:
                loss_sum, correct, n = float(sums[0]), float(sums[1]), float(sums[2])
                out["train_loss"] = loss_sum / n
                out["train_accuracy"] = correct / n
                out["train_error"] = 1.0 - correct / n
            W, b = classifier(accs[""])
            W = None if W is None else _keep_precision(W)
            b = None if b is None else _keep_precision(b)
            out.update(accs[""].result(W, b))
            per_layer = {k: a.result() for k, a in accs.items() if k}

            def sample_passes(loader: Iterable, suffix: str, sums: Tensor | None, within_class: bool) -> None:
                sps = {k: a.sample_pass(*((W, b) if k == "" else (None, None)), within_class=within_class)
                       for k, a in accs.items()}
                _stream_pass(model, taps, loader, device, amp, {k: sp.update for k, sp in sps.items()},
                             num_classes, sums)
                for k, sp in sps.items():
                    if reduce is not None:
                        sp = reduce.sample_pass(sp)
                    (out if k == "" else per_layer[k]).update(sp.result(suffix))

            if train_sample_pass:
                sample_passes(train_loader, "", None, True)
            if test_loader is not None:
                sums = torch.zeros(3, dtype=torch.float64, device=device)
                sample_passes(test_loader, "_test", sums, False)
                if reduce is not None:
                    sums = reduce.sums(sums)
                if float(sums[2]) > 0:
                    out["test_loss"] = float(sums[0]) / float(sums[2])
                if "accuracy_test" in out:
                    out["test_accuracy"] = out["accuracy_test"]
                    out["test_error"] = 1.0 - out["accuracy_test"]
    finally:
        model.train(was_training)
    return out, per_layer, accs[""]


def measure(model: Classifier, train_loader: Iterable, test_loader: Iterable | None, num_classes: int,
            device: torch.device, *, train_sample_pass: bool = False, amp: bool = False,
            reduce: MeasureReduce | None = None) -> tuple[dict[str, float], CollapseAccumulator]:
    """Every collapse measurement of a kit model (eval mode) on the given (un-augmented) loaders: the
    features are the input of ``model.head`` and the classifier is ``model.head.classifier()``; the
    passes are :func:`measure_passes`'s (pass 2 only with ``train_sample_pass``). Features, logits and
    the classifier stay float64 for float64 models and are float32 otherwise."""
    out, _, acc = measure_passes(model, train_loader, test_loader, num_classes, device, tap=FeatureTap(model),
                                 classifier=lambda acc: model.head.classifier(),
                                 train_sample_pass=train_sample_pass, amp=amp, reduce=reduce)
    return out, acc


def recalibrate_batch_norm(model: nn.Module, loader: Iterable, device: torch.device) -> int:
    """Precise batch-norm statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3):
    every batch-norm layer's running mean and variance <- the average over the batches of ``loader`` of
    its batch mean and unbiased batch variance, the statistics its training-mode forward pass computes;
    with one batch (the quick scale's 200 images) these are the training set's own statistics.

    Only the batch-norm layers run in training mode (under no_grad); every other module stays in eval mode,
    so nothing else changes: weights, heads that track class means, dropout. The layers' momentum and the
    model's mode are restored. Returns the number of batch-norm layers recalibrated.

    Why: eval mode normalises with running averages (momentum 0.1, about the last 10 steps). With a few
    steps per epoch at a large learning rate they lag behind the weights, and the measurements (training
    accuracy, NC1, ...) see a network the weights no longer are. :class:`~nc_lib.config.TrainConfig`'s
    ``precise_bn`` calls this before every measurement (and before the checkpoint of that epoch).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(bns)


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
