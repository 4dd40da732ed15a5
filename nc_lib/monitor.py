"""Measure neural collapse while any training loop runs: :class:`CollapseMonitor`, and a Lightning callback.

``monitor = CollapseMonitor(model, train_loader, every=5)``; in the loop, ``monitor.epoch_end(epoch)``
measures the model with :func:`nc_lib.any_model.measure_model` (the engine's passes: one streaming
pass through :class:`nc_lib.metrics.CollapseAccumulator`, the per-sample pass, the test pass) at
the chosen epochs: every ``every`` epochs, a list ``epochs=``, or Papyan, Han & Donoho (2020)'s 50
log-spaced epochs of a run of ``total_epochs`` (:func:`nc_lib.config.papyan_measure_epochs`), the
last epoch always included when ``total_epochs`` is known. ``monitor.history`` holds one record per
measurement (``{"epoch": e, **measurements}``), ``monitor.figure(keys)`` draws them with
:func:`nc_lib.plots.plot_metric_curves`; ``live=True`` redraws a figure in the notebook at each
measurement (a widget where widgets render, else a plain figure: :mod:`nc_lib.frontend`).

:func:`lightning_callback` wraps a monitor as a PyTorch Lightning ``Callback`` (needs the optional
``lightning`` package: ``pip install nc_lib[lightning]``); it measures at the end of each training epoch,
numbered from 1.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from .any_model import measure_model
from .config import papyan_measure_epochs
from .validation import check_int

DEFAULT_KEYS = ("train_error", "within_class_variability", "equiangularity_means", "self_duality")


class CollapseMonitor:
    """Collapse measurements of ``model`` at chosen epochs of any training loop (see the module doc).

    ``every``: measure every ``every`` epochs; ``epochs``: measure at these epochs instead;
    ``papyan=True`` with ``total_epochs``: Papyan's log-spaced epochs. ``kwargs`` go to
    :func:`nc_lib.any_model.measure_model` (``layer``, ``classifier``, ``layers``, ``num_classes``, ``amp``...).
    """

    def __init__(self, model: nn.Module, train_loader: Iterable, every: int | None = 1, test_loader: Iterable | None = None,
                 *, epochs: Sequence[int] | None = None, papyan: bool = False, total_epochs: int | None = None,
                 live: bool = False, live_keys: Sequence[str] = DEFAULT_KEYS, progress: bool = False,
                 **kwargs: Any) -> None:
        self.model = model
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.total_epochs = None if total_epochs is None else check_int("total_epochs", total_epochs, 1)
        if papyan:
            if self.total_epochs is None:
                raise ValueError("papyan=True needs total_epochs (Papyan's epochs are log-spaced over the whole run).")
            self.epochs: set[int] | None = set(papyan_measure_epochs(self.total_epochs))
        elif epochs is not None:
            self.epochs = {check_int("epochs", e, 1) for e in epochs}
        else:
            self.epochs = None
            every = check_int("every", every if every is not None else 1, 1)
        self.every = every
        self.kwargs = dict(kwargs, progress=progress)
        self.history: list[dict[str, Any]] = []
        self.last = None
        self.live_keys = tuple(live_keys)
        self._live = None
        if live:
            from .frontend import in_kernel, show_live, widgets_enabled

            if in_kernel():
                import plotly.graph_objects as go

                base = self.figure(self.live_keys, empty=True)
                self._live = show_live(go.FigureWidget(base) if widgets_enabled() else base, min_interval_s=0.0)

    def should_measure(self, epoch: int) -> bool:
        """Whether ``epoch`` is a measurement epoch (the last of ``total_epochs`` always is)."""
        if self.total_epochs is not None and epoch == self.total_epochs:
            return True
        if self.epochs is not None:
            return epoch in self.epochs
        return epoch % self.every == 0

    def measure(self, epoch: int) -> dict[str, Any]:
        """Measure now, whatever the epoch; the record joins ``history``."""
        self.last = measure_model(self.model, self.train_loader, self.test_loader, **self.kwargs)
        record = {"epoch": int(epoch), **self.last.values}
        self.history.append(record)
        if self._live is not None:
            self._update_live()
        return record

    def epoch_end(self, epoch: int) -> dict[str, Any] | None:
        """Call at the end of epoch ``epoch`` (from 1): the new record at a measurement epoch, else None."""
        return self.measure(epoch) if self.should_measure(check_int("epoch", epoch, 0)) else None

    def figure(self, keys: Sequence[str] = DEFAULT_KEYS, *, empty: bool = False, **kwargs: Any) -> Any:
        """The curves of ``keys`` against the epoch (:func:`nc_lib.plots.plot_metric_curves`)."""
        from .plots import plot_metric_curves

        records = [] if empty else self.history
        if not empty and not records:
            raise ValueError("nothing measured yet: call epoch_end(epoch) in the training loop first.")
        if empty:
            import plotly.graph_objects as go

            fig = go.Figure([go.Scatter(x=[], y=[], mode="lines+markers", name=k) for k in keys])
            fig.update_layout(xaxis_title="epoch", yaxis_type="log", height=320)
            return fig
        return plot_metric_curves({"monitor": records}, list(keys), x="epoch", **kwargs)

    def _update_live(self) -> None:
        from .frontend import redraw_live

        fig = self._live
        with fig.batch_update():
            for tr, k in zip(fig.data, self.live_keys):
                pts = [(r["epoch"], r[k]) for r in self.history if k in r]
                tr.x = [e for e, _ in pts]
                tr.y = [max(v, 1e-12) for _, v in pts]
        redraw_live(fig)

    def finish(self) -> None:
        """Leave a plain (static) figure behind the live one."""
        if self._live is not None:
            from .frontend import finish_live

            finish_live(self._live)


def lightning_callback(monitor: CollapseMonitor) -> Any:
    """``monitor`` as a ``lightning.pytorch.Callback``: ``monitor.epoch_end(trainer.current_epoch + 1)`` at the
    end of each training epoch (on rank 0). Raises ImportError naming the extra when Lightning is missing."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback  # type: ignore[no-redef]
        except ImportError as e:
            raise ImportError("the Lightning callback needs Lightning: pip install 'nc_lib[lightning]' "
                              "(or pip install lightning).") from e

    class CollapseCallback(Callback):
        """Collapse measurements at the end of the training epochs of a Lightning Trainer."""

        def __init__(self) -> None:
            super().__init__()
            self.monitor = monitor

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.is_global_zero:
                self.monitor.epoch_end(trainer.current_epoch + 1)

    return CollapseCallback()
