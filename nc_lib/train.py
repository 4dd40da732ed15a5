"""The training engine: train real networks and measure neural collapse while they train.

:func:`train` trains a :class:`nc_lib.config.TrainConfig` (or loads it when it has already
finished) into its run directory (:mod:`nc_lib.runs`: files, checkpoints, resuming), measuring at
its measurement epochs with :func:`nc_lib.features.measure`. A killed run restarts from its last
checkpoint and, on the CPU, reproduces the numbers of an uninterrupted run exactly: batch order
depends only on (seed, epoch) and the RNG states are restored. :func:`run_epochs` is the epoch loop
shared with data-parallel runs (:mod:`nc_lib.distributed`), :func:`train_epoch` one epoch.

Measurements (Papyan, Han & Donoho 2020, REFERENCE.md section 2), at each measurement epoch, in
eval mode, on the *un-augmented* training set: the penultimate features are streamed through a
forward hook on the head into :class:`nc_lib.metrics.CollapseAccumulator` (no N x p matrix is ever
held), together with the training loss and accuracy; then one pass over the test set gives the
test loss and accuracy and, against the *training* class means, the NCC mismatch, NCC accuracy and
cosine margins (keys ``*_test``). ``train_sample_pass=True`` adds a second training pass for the
per-sample measurements on the training set (NCC mismatch, cosine margin).

Loss: cross-entropy + ``feature_decay``/2 * mean_i ||h_i||^2 on the *raw* penultimate features
(Zhu et al. 2021's lambda_H; their code penalised normalised features, whose gradient is zero) +
weight decay through the optimiser (added to the loss for LBFGS). Heads with ``needs_labels``
(Markou's implicit ETF head) are called as ``head(h, y)`` in training; heads with
``renormalise_after_step`` (Markou's cosine head) get ``head.renormalise_()`` after every step.

Optimisers: SGD (momentum), Adam, LBFGS (strong Wolfe) with a step or multistep lr schedule, and
``optimizer="agd"``, automatic gradient descent (Bernstein et al. 2023, :mod:`nc_lib.agd`; Markou
et al. 2024's released scripts train with it). AGD has no learning rate, schedule or weight decay:
``weight_decay`` (and ``head_weight_decay``) must be 0 and the schedule constant (``schedule="none"``),
else TrainConfig raises ValueError; ``lr``, ``momentum``, ``gamma``, ``step_size`` are unused and
``agd_gain`` scales its steps. AGD updates the weight tensors only: the model's 1-D parameters
(biases, batch-norm scales and shifts) are *frozen*, and a fresh run sets them to 0 (biases) and 1
(normalisation weights), so the network computes what the released scripts' networks (no biases,
``BatchNorm(affine=False)``) compute, then draws AGD's orthogonal initialisation from the seeded RNG;
a resumed run takes both from its checkpoint. The records' ``lr`` is then the epoch's mean
automatic step size eta.

``stratified_batches=True`` draws the training batches with
:class:`nc_lib.data.StratifiedBatchSampler` (seeded by ``seed``, epoch set by the engine):
every class is in every batch when num_classes <= batch_size, as Markou et al.'s implicit ETF head
needs; batches are then of balanced size (about N/ceil(N/batch_size)).
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import features
from .agd import AGD, agd_parameters, reset_frozen_parameters
from .config import (PAPYAN_LRS, TrainConfig, build_run_model, load_run_data, place_run_data, prepare_for_training,
                     resolve_device, uses_channels_last)
from .data import make_loader, set_loader_epoch, without_augmentation
from .deprecation import moved_names
from .models import Classifier
from .runs import (LOCK_NAME, EpochResult, RunResult, RunWriter, hold_run_lock, load_run, resume_checkpoint,
                   run_dir, write_run_start)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def _make_optimizer(config: TrainConfig, model: Classifier) -> torch.optim.Optimizer:
    """The optimiser of ``config``. AGD (:class:`nc_lib.agd.AGD`, gain ``agd_gain``) gets the model's
    weight tensors; its 1-D parameters (biases, batch-norm scales and shifts) are frozen here
    (``requires_grad=False``), and :func:`_fresh_start` sets them to 0 / 1 in a fresh run, as in
    the released AGD networks (no biases, ``BatchNorm(affine=False)``)."""
    if config.optimizer == "agd":
        return AGD(agd_parameters(model), gain=config.agd_gain)
    body = [p for p in model.body.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    hwd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
    if config.optimizer == "lbfgs":  # weight decay goes into the closure's loss
        return torch.optim.LBFGS(body + head, lr=config.lr, history_size=config.lbfgs_history,
                                 line_search_fn="strong_wolfe")
    groups = [{"params": body, "weight_decay": config.weight_decay}]
    if head:
        groups.append({"params": head, "weight_decay": hwd})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(groups, lr=config.lr)


class NoSchedule:
    """The scheduler of an optimiser without a learning rate (AGD): ``step`` does nothing, and the
    state dict is empty (checkpoints keep their ``scheduler`` entry)."""

    def step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _make_scheduler(config: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``config``: step, multistep, constant, or none at all for AGD."""
    if config.optimizer == "agd":
        return NoSchedule()  # type: ignore[return-value]
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    if config.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def _fresh_start(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """What a fresh run (no checkpoint to resume) does to the built model before its first epoch:
    under AGD, the frozen 1-D parameters take the values of a network without them
    (:func:`nc_lib.agd.reset_frozen_parameters`) and the weights AGD's orthogonal initialisation
    (:meth:`nc_lib.agd.AGD.init_weights`, from the seeded RNG). Nothing for other optimisers."""
    if isinstance(opt, AGD):
        reset_frozen_parameters(model)
        opt.init_weights()
        head = getattr(model, "head", None)
        if getattr(head, "renormalise_after_step", False):  # keep the cosine head's unit rows
            head.renormalise_()


def training_loss(name: str = "ce") -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss of ``TrainConfig.loss``, mean over the batch: ``"ce"`` cross-entropy;
    ``"mse"`` the squared loss on one-hot targets, mean over the N x C entries,
    mean_{i,c} (z_ic - 1[y_i = c])^2, as ``nn.MSELoss()(out, one_hot(y))`` in Papyan et al.'s Colab
    (Han, Papyan & Donoho 2022 study neural collapse under it)."""
    if name == "ce":
        return nn.CrossEntropyLoss()

    def mse(logits: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(logits, nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype))

    return mse


class _Step(nn.Module):
    """body + head in one forward (so DDP sees every parameter): returns (features, logits); heads
    with ``needs_labels`` get the labels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.needs_labels = bool(getattr(model.head, "needs_labels", False))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.model.body(x)
        return h, (self.model.head(h, y) if self.needs_labels else self.model.head(h))



def train_epoch(model: Classifier, loader: Iterable, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, device: torch.device, epoch: int, *,
                amp: bool = False, forward: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                loss_weight: Callable[[int, Tensor], float] | None = None,
                reduce_sums: Callable[[Tensor], Tensor] | None = None) -> EpochResult:
    """One training epoch of ``model`` (train mode): one pass over ``loader``, then one scheduler step.

    Per batch: h = body(x), logits = head(h) (``head(h, y)`` for heads with ``needs_labels``),
    loss = CE(logits, y) (or the one-hot squared loss, ``loss="mse"``, :func:`training_loss`) + ``feature_decay``/2 * mean_i ||h_i||^2 (Zhu et al. 2021's lambda_H, on the
    raw features); LBFGS evaluates it in a closure that also adds the weight decays
    (weight_decay/2 * ||theta_body||^2 + head_weight_decay/2 * ||theta_head||^2); then backward, step,
    and ``head.renormalise_()`` for heads with ``renormalise_after_step`` (Markou et al. 2024's cosine head).
    AGD (:class:`nc_lib.agd.AGD`) steps like SGD without a learning rate; the epoch's ``lr`` is then
    the mean of its step sizes eta (every rank computes the same eta from the all-reduced gradients).

    Hooks for data-parallel training: ``forward(x, y) -> (h, logits)`` replaces :class:`_Step` (body + head;
    a DDP wrapper of it); ``loss_weight(i, y)`` multiplies batch i's loss before backward; ``reduce_sums(t)``
    reduces the running float64 sums ``[sum loss * len(y), correct, n]`` (an all-reduce).
    Raises FloatingPointError when the summed loss is not finite.
    """
    model.train()
    ce = training_loss(config.loss)
    renormalise = bool(getattr(model.head, "renormalise_after_step", False))
    forward = _Step(model) if forward is None else forward
    lbfgs = config.optimizer == "lbfgs"
    if lbfgs:
        body_params = [p for p in model.body.parameters() if p.requires_grad]
        head_params = [p for p in model.head.parameters() if p.requires_grad]
        head_wd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
    agd = isinstance(opt, AGD)
    # running sums stay on the device: no host synchronisation per step
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, n
    eta_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    nhwc = uses_channels_last(config, device, warn=False)  # prepare_for_training warned once
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if nhwc and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if lbfgs:
            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                h, out = forward(x, y)
                loss = ce(out, y)
                if config.feature_decay > 0:
                    loss = loss + 0.5 * config.feature_decay * h.pow(2).sum(1).mean()
                if config.weight_decay > 0:
                    loss = loss + 0.5 * config.weight_decay * sum(p.pow(2).sum() for p in body_params)
                if head_wd > 0 and head_params:
                    loss = loss + 0.5 * head_wd * sum(p.pow(2).sum() for p in head_params)
                (loss if loss_weight is None else loss * loss_weight(i, y)).backward()
                closure.logits = out.detach()  # type: ignore[attr-defined]
                return loss
            loss = opt.step(closure)
            logits = closure.logits  # type: ignore[attr-defined]
        else:
            opt.zero_grad(set_to_none=True)
            with features.autocast(device, amp):
                h, logits = forward(x, y)
                loss = ce(logits.float(), y)
                if config.feature_decay > 0:
                    loss = loss + 0.5 * config.feature_decay * h.float().pow(2).sum(1).mean()
            (loss if loss_weight is None else loss * loss_weight(i, y)).backward()
            opt.step()
            if agd and opt.last_eta is not None:
                eta_sum += opt.last_eta.double()
        steps += 1
        if renormalise:
            with torch.no_grad():
                model.head.renormalise_()
        sums[0] += loss.detach().double() * len(y)
        sums[1] += (logits.detach().argmax(1) == y).sum()
        sums[2] += len(y)
    if reduce_sums is not None:
        sums = reduce_sums(sums)
    loss_sum, correct, n = float(sums[0]), int(sums[1]), int(sums[2])
    lr_used = float(eta_sum) / max(steps, 1) if agd else opt.param_groups[0]["lr"]
    sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not math.isfinite(loss_sum):
        what = f"agd_gain={config.agd_gain}" if agd else f"lr={config.lr}"
        raise FloatingPointError(f"training diverged at epoch {epoch} (loss {loss_sum / max(n, 1)}); lower {what}.")
    return EpochResult(loss_sum, correct, n, lr_used)



def train(config: TrainConfig, *, progress: bool = True, on_measure: Callable[[dict[str, Any]], None] | None = None,
          stop_after_epochs: int | None = None, retrain: bool = False, wait_for_lock_s: float = 0.0) -> RunResult:
    """Train ``config`` (or load it if finished), measuring collapse at its measurement epochs.

    progress: tqdm.auto bar over epochs. on_measure: called with every new measurement record
    (e.g. :func:`live_plot`). stop_after_epochs: stop (as if killed) once that many epochs are
    done in total; calling again resumes from the last checkpoint. retrain: delete any earlier
    files of this run and start over.

    One writer per run: the engine holds the run's lock (:func:`nc_lib.runs.hold_run_lock`) while it
    trains; when another live process holds it, this waits ``wait_for_lock_s`` seconds for it, then raises
    :class:`nc_lib.runs.RunLockedError` naming that process and its host (a dead holder's lock is taken
    over). A run directory made by this call is removed again if the call fails before its first checkpoint.
    Damaged run files: see :mod:`nc_lib.runs` (recovered, or a RunFileError saying what to do).
    """
    path = run_dir(config)
    if (path / "done.json").exists() and not retrain:
        return load_run(config)
    created = not path.exists()
    with hold_run_lock(path, wait_s=wait_for_lock_s):
        if retrain:
            import shutil

            for child in path.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif (path / "done.json").exists():  # finished by another process while this one waited
            return load_run(config)
        try:
            return _train_locked(config, path, progress=progress, on_measure=on_measure,
                                 stop_after_epochs=stop_after_epochs)
        except BaseException:
            if created and not any((path / "checkpoints").glob("epoch_*.pt")):
                import shutil

                shutil.rmtree(path, ignore_errors=True)  # no orphan directory for a run that never got going
            raise


def _train_locked(config: TrainConfig, path: Path, *, progress: bool,
                  on_measure: Callable[[dict[str, Any]], None] | None, stop_after_epochs: int | None) -> RunResult:
    """The body of :func:`train`, with the run's lock held."""
    device = resolve_device(config.device)
    write_run_start(path, config, device)

    train_set, test_set = place_run_data(config, load_run_data(config), device)
    C = train_set.num_classes
    pin = device.type == "cuda"  # host-resident batches only (make_loader ignores it for device-resident data)
    # a last batch of one sample would break batch norm in training mode: drop it in that case only
    # (stratified batches have balanced sizes)
    drop_last = len(train_set) % config.batch_size == 1 and len(train_set) > 1 and not config.stratified_batches
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, pin_memory=pin,
                               drop_last=drop_last, stratified=config.stratified_batches)
    eval_train = make_loader(without_augmentation(train_set), config.eval_batch_size, shuffle=False, pin_memory=pin)
    eval_test = make_loader(test_set, config.eval_batch_size, shuffle=False, pin_memory=pin)
    snap_idx = features.snapshot_indices(train_set.targets, config.snapshot_per_class, C, config.data_seed) \
        if config.snapshot_per_class > 0 else None

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2 ** 32))
    random.seed(config.seed)
    model_info = {"num_classes": C, "input_shape": list(train_set.input_shape)}
    model = prepare_for_training(build_run_model(config, device, model_info), config, device)
    opt = _make_optimizer(config, model)
    sched = _make_scheduler(config, opt)
    start = resume_checkpoint(path, model, opt, sched, config=config)
    if start == 0:
        _fresh_start(model, opt)
    writer = RunWriter(config, path, model_info, without_augmentation(train_set), snap_idx)
    writer.resume(start)

    use_amp = config.amp and device.type == "cuda" and config.optimizer != "lbfgs"

    def train_one(epoch: int) -> EpochResult:
        set_loader_epoch(train_loader, epoch)
        return train_epoch(model, train_loader, opt, sched, config, device, epoch, amp=use_amp)

    def measure_one(epoch: int, ep: EpochResult) -> None:
        if config.precise_bn:  # before the measurement, the snapshot and the checkpoint of this epoch
            features.recalibrate_batch_norm(model, eval_train, device)
        writer.measure(epoch, ep, model, opt, sched, device,
                       lambda: features.measure(model, eval_train, eval_test, C, device,
                                                train_sample_pass=config.train_sample_pass),  # float32 always
                       on_measure=on_measure)

    stopped = run_epochs(config, start, writer, train_one, measure_one, progress=progress,
                         desc=f"{config.model} on {config.dataset}", stop_after_epochs=stop_after_epochs)
    if stopped:
        return RunResult(config, path, writer.records, False)
    writer.finish()
    return RunResult(config, path, writer.records, True)


def run_epochs(config: TrainConfig, start: int, writer: RunWriter, train_one: Callable[[int], EpochResult],
               measure_one: Callable[[int, EpochResult], None], *, progress: bool, desc: str,
               stop_after_epochs: int | None = None) -> bool:
    """The epoch loop of a run, in one process (:func:`train`) or on every rank (:mod:`nc_lib.distributed`):
    epochs ``start + 1 .. config.epochs``, ``train_one(epoch)`` each (its time added to ``writer.t_train``),
    ``measure_one(epoch, result)`` at ``config.measurement_epochs()``, a tqdm bar with ``progress``.
    Returns True when it stopped after ``stop_after_epochs`` (an interrupted run, resumable), else False."""
    measure_at = set(config.measurement_epochs())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=start, desc=desc, unit="epoch")
    try:
        for epoch in range(start + 1, config.epochs + 1):
            if stop_after_epochs is not None and epoch > stop_after_epochs:
                return True
            t0 = time.perf_counter()
            ep = train_one(epoch)
            writer.t_train += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ep.loss_sum / ep.n:.4f}", acc=f"{ep.correct / ep.n:.3f}")
            if epoch in measure_at:
                measure_one(epoch, ep)
    finally:
        if bar is not None:
            bar.close()
    return False


# ----------------------------------------------------------------------------------------------
# Helpers for notebooks
# ----------------------------------------------------------------------------------------------
def live_plot(keys: Sequence[str] = ("train_error", "test_error", "within_class_variability"),
              log_y: bool = True) -> Callable[[dict[str, Any]], None]:
    """An ``on_measure`` callback that shows a live plot in a notebook (one line per key against epoch): a
    plotly FigureWidget where widgets render, else a plain figure redrawn at each measurement
    (:mod:`nc_lib.frontend`). ``callback.finish()`` leaves a plain figure in either case. Outside a
    notebook it does nothing."""
    from .frontend import finish_live, in_kernel, redraw_live, show_live, widgets_enabled

    if not in_kernel():
        return lambda record: None
    import plotly.graph_objects as go

    base = go.Figure(data=[go.Scatter(x=[], y=[], mode="lines+markers", name=k) for k in keys])
    base.update_layout(xaxis_title="epoch", xaxis_type="log", yaxis_type="log" if log_y else "linear",
                       height=320, margin=dict(l=40, r=10, t=30, b=40))
    fig = show_live(go.FigureWidget(base) if widgets_enabled() else base, min_interval_s=0.0)

    def update(record: dict[str, Any]) -> None:
        with fig.batch_update():
            for tr, k in zip(fig.data, keys):
                if k in record:
                    v = record[k]
                    tr.x = tuple(tr.x) + (record["epoch"],)
                    tr.y = tuple(tr.y) + (max(v, 1e-12) if log_y else v,)
        redraw_live(fig)

    update.figure = fig  # type: ignore[attr-defined]
    update.finish = lambda: finish_live(fig)  # type: ignore[attr-defined]
    return update


def lr_sweep(config: TrainConfig, lrs: Sequence[float] = PAPYAN_LRS, *, progress: bool = True,
             skip_diverged: bool = True) -> dict[str, Any]:
    """Train ``config`` at every learning rate and pick the best final test error (Papyan).

    Returns ``{"best_lr", "best_config", "results": [{"lr", "test_error", "train_error"}]}``. Runs
    that diverge count as test error 1 (with ``skip_diverged``) instead of raising.
    """
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate.")
    results = []
    for lr in lrs:
        cfg = config.replace(lr=float(lr))
        try:
            run = train(cfg, progress=progress)
            final = run.final
            results.append({"lr": float(lr), "test_error": final.get("test_error", 1.0),
                            "train_error": final.get("train_error", 1.0)})
        except FloatingPointError:
            if not skip_diverged:
                raise
            results.append({"lr": float(lr), "test_error": 1.0, "train_error": 1.0, "diverged": True})
    best = min(results, key=lambda r: (r["test_error"], r["lr"]))
    return {"best_lr": best["lr"], "best_config": config.replace(lr=best["lr"]), "results": results}


# ----------------------------------------------------------------------------------------------
# Names that lived here until 0.1: still importable from here for one release, with a DeprecationWarning
# ----------------------------------------------------------------------------------------------
__getattr__ = moved_names(__name__, {
    **{n: "nc_lib.config" for n in ("OPTIMIZERS", "SCHEDULES", "DEVICES", "PAPYAN_EPOCHS", "UNHASHED_FIELDS",
                                     "HASHED_UNLESS_DEFAULT", "papyan_measure_epochs", "papyan_preset")},
    **{n: "nc_lib.runs" for n in ("run_history", "is_finished", "environment_record")},
    **{n: "nc_lib.features" for n in ("measure", "FeatureTap", "MeasureReduce")},
})
