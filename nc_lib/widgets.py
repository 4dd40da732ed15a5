"""Classroom widgets: the UFM explorer and the simplex-ETF explorer.

:class:`UFMExplorer` lets a student choose C, d, n, the loss, the optimiser, the learning rate,
the three weight decays and the number of steps, press **Train**, watch the objective and the
collapse metrics update live, and then play the collapse animation. Invalid combinations (for
example a fixed ETF head with d < C, or a learning rate that makes training diverge) produce a
clear message in the widget instead of a stack trace.

Headless (tests, papermill), ``UFMExplorer().run()`` trains once at the current values and
returns the figures; :func:`ufm_explorer` builds one, displays it and, by default, runs it once.

Where widgets cannot render (Colab, nbconvert/papermill, a static site, ``NC_WIDGETS=0``; see
:mod:`nc_lib.frontend`) each explorer prints one line saying so and shows plain figures for its
current (default) values instead: the UFM explorer its live metrics (redrawn while it trains) and
its animation, the ETF explorer its figure. :func:`show_controls` does the same for a notebook's own
controls-plus-figure box.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

import torch
from torch import Tensor

from . import frontend, plots, ufm
from .etf import simplex_etf
from .plots import collapse_animation, live_metrics_figure, plot_metric_curves, update_live_figure

#: Keys plotted live and in the final curves.
EXPLORER_KEYS = ("objective", "accuracy", "within_class_variability", "classifier_etf_distance",
                 "classifier_means_alignment", "bias_offset_norm")


class UFMExplorer:
    """An ipywidgets UFM explorer. ``widget`` is the box to display; ``button`` the Train button.

    After a run: ``history`` (the :class:`~nc_lib.ufm.UFMHistory`), ``figures`` (dict with
    ``"metrics"`` and ``"animation"``), ``message`` (the HTML status line's text), ``error``
    (the last error message or None).
    """

    def __init__(self, *, C: int = 4, d: int = 16, n: int = 20, loss: str = "ce", optimizer: str = "gd",
                 lr: float | None = None, lambda_W: float = 5e-4, lambda_H: float = 5e-4, lambda_b: float = 5e-4,
                 steps: int = 600, measure_every: int = 10, head: str = "linear", seed: int = 0,
                 live: bool = True) -> None:
        import ipywidgets as W

        style = {"description_width": "90px"}
        lay = W.Layout(width="210px")
        self.C = W.BoundedIntText(value=C, min=2, max=1000, description="classes C", style=style, layout=lay)
        self.d = W.BoundedIntText(value=d, min=1, max=4096, description="dim d", style=style, layout=lay)
        self.n = W.BoundedIntText(value=n, min=1, max=5000, description="n per class", style=style, layout=lay)
        self.loss = W.Dropdown(options=list(ufm.LOSSES), value=loss, description="loss", style=style, layout=lay)
        self.optimizer = W.Dropdown(options=list(ufm.OPTIMIZERS), value=optimizer, description="optimiser",
                                    style=style, layout=lay)
        self.head = W.Dropdown(options=list(ufm.HEADS), value=head, description="classifier", style=style, layout=lay)
        self.lr = W.FloatText(value=0.0 if lr is None else lr, description="lr (0=auto)", style=style, layout=lay)
        self.lambda_W = W.FloatText(value=lambda_W, description="λ_W", style=style, layout=lay)
        self.lambda_H = W.FloatText(value=lambda_H, description="λ_H", style=style, layout=lay)
        self.lambda_b = W.FloatText(value=lambda_b, description="λ_b", style=style, layout=lay)
        self.steps = W.BoundedIntText(value=steps, min=1, max=100000, description="steps", style=style, layout=lay)
        self.measure_every = W.BoundedIntText(value=measure_every, min=1, max=10000, description="measure every",
                                              style=style, layout=lay)
        self.seed = W.BoundedIntText(value=seed, min=0, max=10 ** 6, description="seed", style=style, layout=lay)
        self.button = W.Button(description="Train", button_style="primary", icon="play")
        self.status = W.HTML(value="Choose the settings and press <b>Train</b>.")
        self.animation_output = W.Output()
        self.live = live
        self.widget_mode = frontend.widgets_enabled()
        self._shown_static = False  # displayed where widgets cannot render: figures are shown plainly
        # the live figure is a child widget of the explorer (not displayed through an Output area);
        # without widgets it is a plain figure redrawn in place once the explorer is displayed
        self.live_figure: Any = live_metrics_figure(EXPLORER_KEYS, widget=self.widget_mode) if live else None
        self.button.on_click(self._on_click)
        grid = W.GridBox([self.C, self.d, self.n, self.seed, self.loss, self.optimizer, self.head, self.lr,
                          self.lambda_W, self.lambda_H, self.lambda_b, self.steps, self.measure_every],
                         layout=W.Layout(grid_template_columns="repeat(4, 230px)"))
        children = [grid, W.HBox([self.button, self.status])]
        if self.live_figure is not None and self.widget_mode:
            children.append(self.live_figure)
        self.widget = W.VBox(children + [self.animation_output])
        self.history: ufm.UFMHistory | None = None
        self.figures: dict[str, go.Figure] = {}
        self.error: str | None = None
        self.runs = 0

    # ---- state
    def config(self) -> ufm.UFMConfig:
        """The UFMConfig of the current widget values (validated: raises ValueError)."""
        return ufm.as_config(ufm.UFMConfig(
            num_classes=self.C.value, feature_dim=self.d.value, n_per_class=self.n.value, loss=self.loss.value,
            optimizer=self.optimizer.value, lr=None if not self.lr.value else self.lr.value,
            lambda_W=self.lambda_W.value, lambda_H=self.lambda_H.value, lambda_b=self.lambda_b.value,
            head=self.head.value, seed=self.seed.value))

    @property
    def message(self) -> str:
        return self.status.value

    def _say(self, text: str, kind: str = "info") -> None:
        colour = {"info": "#333", "error": "#b00020", "ok": "#1b5e20"}[kind]
        self.status.value = f'<span style="color:{colour}">{text}</span>'

    # ---- actions
    def _on_click(self, _button: Any = None) -> None:
        self.run()

    def run(self) -> dict[str, go.Figure]:
        """Train at the current values; show live metrics, then the animation. Returns the figures
        (empty if the settings are invalid; the reason is in :attr:`message` and :attr:`error`)."""
        self.error = None
        self.figures = {}
        try:
            cfg = self.config()
            if cfg.num_samples * cfg.feature_dim > 20_000_000:
                raise ValueError(f"N d = {cfg.num_samples} x {cfg.feature_dim} is too large for the explorer "
                                 "(at most 2e7 feature entries): lower C, n or d.")
            if self.steps.value // self.measure_every.value > 2000:
                raise ValueError("steps / measure_every must be at most 2000 measurements: raise 'measure every'.")
        except ValueError as err:
            self.error = str(err)
            self._say("Invalid settings: " + html.escape(str(err)), "error")
            return {}
        self.button.disabled = True
        self._say(f"Training {cfg.num_classes} classes, d = {cfg.feature_dim}, n = {cfg.counts()[0]} per class, "
                  f"{cfg.optimizer} (lr {cfg.learning_rate:g}), {cfg.loss} …")
        fig = self.live_figure
        if fig is not None:
            update_live_figure(fig, [], EXPLORER_KEYS)
        try:
            self.history = ufm.train_ufm(cfg, self.steps.value, self.measure_every.value, progress=False,
                                         live=fig if fig is not None else False, live_keys=EXPLORER_KEYS)
        except (ValueError, FloatingPointError) as err:
            self.error = str(err)
            self._say("Training stopped: " + html.escape(str(err)), "error")
            return {}
        finally:
            self.button.disabled = False
        h = self.history
        metrics = plot_metric_curves({"run": h}, EXPLORER_KEYS, log_y=[k for k in EXPLORER_KEYS if k not in ("objective", "accuracy")],
                                     title="Loss and collapse metrics")
        try:
            anim = collapse_animation(h, max_frames=40)
        except ValueError as err:  # e.g. too few snapshots
            anim = None
            self._say(html.escape(str(err)), "error")
        self.figures = {"metrics": metrics} | ({"animation": anim} if anim is not None else {})
        if anim is not None:
            _set_output_figure(self.animation_output, anim)
        last = h.last
        self.runs += 1
        self._say(f"Done in {h.elapsed:.1f} s: objective {last['objective']:.5g}, accuracy {last['accuracy']:.3f}, "
                  f"NC1 {last['within_class_variability']:.2e}, NC2 {last['classifier_etf_distance']:.2e}. "
                  "Press ▶ in the animation below.", "ok")
        if fig is not None:
            update_live_figure(fig, h.records, EXPLORER_KEYS)
            frontend.finish_live(fig)
        if self._shown_static:
            self._show_static_results()
        return self.figures

    def save_animation(self, path: str | Path, **kwargs: Any) -> list[Path]:
        """The last run's collapse animation as a GIF (and MP4) for slides: :func:`nc_lib.plots.save_animation`."""
        if "animation" not in self.figures:
            raise ValueError("the explorer has no animation yet: press Train (or call run()) first.")
        return plots.save_animation(self.figures["animation"], path, **kwargs)

    def _show_static_results(self) -> None:
        from IPython.display import display

        print(_text(self.message))
        if "animation" in self.figures:
            display(self.figures["animation"])

    def _ipython_display_(self) -> None:
        from IPython.display import display
        if self.widget_mode:
            display(self.widget)
            return
        print(frontend.static_notice("the explorer's run"))
        self._shown_static = True
        if self.live_figure is not None:
            frontend.show_live(self.live_figure)
        if self.figures:
            self._show_static_results()


def _text(markup: str) -> str:
    """The text of a status line's HTML."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def _set_output_figure(output: Any, fig: go.Figure) -> None:
    """Put a plotly figure (frames included) into an Output widget as one display_data bundle.

    Setting the widget's ``outputs`` sends one state update; printing a large animation through
    ``with output: fig.show()`` instead streams it through the output-capture path, which headless
    executors (nbclient/papermill) can stall on."""
    import json

    bundle = {"application/vnd.plotly.v1+json": json.loads(fig.to_json()),
              "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn", auto_play=False)}
    output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)


def ufm_explorer(run: bool = True, display: bool = True, **defaults: Any) -> UFMExplorer:
    """Build a :class:`UFMExplorer` (keyword defaults as its constructor), display it, and with ``run``
    train once at its defaults (so a headless run still produces its figures: ``explorer.figures``)."""
    ex = UFMExplorer(**defaults)
    if display:
        from IPython.display import display as show
        show(ex)
    if run:
        ex.run()
    return ex


class EtfExplorer:
    """Classroom widget: a C slider (2..8), a toggle for random class means, live measurements.

    ``figure()`` returns the figure at the current values; headless, ``EtfExplorer().figure()`` is
    the figure at the defaults.
    """

    def __init__(self, C: int = 4, max_C: int = 8, random_means: bool = False, seed: int = 0) -> None:
        import ipywidgets as W

        self.seed = seed
        self.slider = W.IntSlider(value=C, min=2, max=max_C, description="C", continuous_update=False)
        self.random = W.Checkbox(value=random_means, description="random class means instead of an ETF")
        self.readout = W.HTML()
        self.output = W.Output()
        self.slider.observe(self._redraw, names="value")
        self.random.observe(self._redraw, names="value")
        self.widget = W.VBox([W.HBox([self.slider, self.random]), self.readout, self.output])
        self.redraws = 0
        self._redraw()

    def means(self) -> Tensor:
        C = self.slider.value
        if self.random.value:
            g = torch.Generator().manual_seed(self.seed + C)
            return torch.randn(C, C, generator=g, dtype=torch.float64)
        return 0.8 * simplex_etf(C)

    def figure(self) -> go.Figure:
        return plots.etf_figure(self.slider.value, means=self.means(), features_per_class=12)

    def _redraw(self, *_: Any) -> None:
        rows = plots.etf_measurements(self.means() - self.means().mean(0))
        self.readout.value = ("<b>class means:</b> " + ", ".join(f"{k} = {v:.3g}" for k, v in rows.items())
                              + " &nbsp; (all 0 for a simplex ETF)")
        _set_output_figure(self.output, self.figure())
        self.redraws += 1

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if frontend.widgets_enabled():
            display(self.widget)
            return
        print(frontend.static_notice("the figure"))
        print(_text(self.readout.value))
        display(self.figure())


def show_controls(controls: Any, figure: Any) -> None:
    """Display ipywidgets ``controls`` above a ``figure`` (a FigureWidget they update) where widgets render;
    elsewhere print one line saying so and show the figure at its current values as a plain figure."""
    from IPython.display import display

    if frontend.widgets_enabled():
        import ipywidgets as W

        display(W.VBox([controls, figure]))
        return
    print(frontend.static_notice("the figure"))
    display(frontend.plain_figure(figure))
