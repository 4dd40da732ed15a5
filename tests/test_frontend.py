"""Figures that work everywhere: the widget mode, live figures redrawn in place where FigureWidget cannot
render, and explorers that print one line and show their default figure there (nc_lib.frontend)."""
from __future__ import annotations

import sys
import types

import plotly.graph_objects as go
import pytest
from plotly.basedatatypes import BaseFigure

from nc_lib import frontend, plots
from nc_lib.ufm import UFMConfig, train_ufm


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv(frontend.ENV, raising=False)
    frontend.set_widget_mode("auto")
    yield
    frontend.set_widget_mode("auto")


def _shown(obj, raw=False):
    """What a front-end would draw: a plotly MIME bundle is read back into a figure."""
    if raw and "application/vnd.plotly.v1+json" in obj:
        return go.Figure(obj["application/vnd.plotly.v1+json"])
    return obj


class Handle:
    def __init__(self):
        self.updates = []

    def update(self, obj, raw=False):
        self.updates.append(_shown(obj, raw))


@pytest.fixture
def kernel(monkeypatch):
    """A pretend kernel: in_kernel() is True and IPython's display records what is shown."""
    shown, handles = [], []

    def display(*objs, display_id=None, raw=False, **_):
        for obj in objs:  # as IPython does: an object that displays itself (an explorer) is asked to
            if hasattr(obj, "_ipython_display_") and not isinstance(obj, BaseFigure):
                obj._ipython_display_()
            else:
                shown.append(_shown(obj, raw))
        if display_id:
            handles.append(Handle())
            return handles[-1]
        return None

    import IPython.display

    import plotly.io as pio

    monkeypatch.setattr(frontend, "in_kernel", lambda: True)
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")  # as in a kernel
    monkeypatch.setattr(IPython.display, "display", display)
    return types.SimpleNamespace(shown=shown, handles=handles)


@pytest.fixture
def static_kernel(kernel, monkeypatch):
    """The pretend kernel of a front-end without a widget manager (as papermill, Colab)."""
    monkeypatch.setenv("NC_WIDGETS", "0")
    return kernel


def test_widget_mode_setting_and_environment(monkeypatch):
    assert not frontend.widgets_enabled()  # pytest is no kernel
    assert frontend.widgets_off_reason() == "not running in a Jupyter kernel"
    monkeypatch.setenv("NC_WIDGETS", "1")
    assert frontend.widgets_enabled()
    frontend.set_widget_mode(False)
    assert not frontend.widgets_enabled() and frontend.widgets_off_reason() == "set_widget_mode(False)"
    frontend.set_widget_mode("auto")
    monkeypatch.setenv("NC_WIDGETS", "0")
    assert frontend.widgets_off_reason() == "NC_WIDGETS=0"
    monkeypatch.setenv("NC_WIDGETS", "yes")
    with pytest.raises(ValueError, match="NC_WIDGETS"):
        frontend.widgets_enabled()
    with pytest.raises(ValueError, match="mode"):
        frontend.set_widget_mode("on")


def test_auto_mode_in_a_kernel_and_in_colab(kernel, monkeypatch):
    assert frontend.widgets_enabled()
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert not frontend.widgets_enabled() and "Colab" in frontend.widgets_off_reason()
    assert "JupyterLab" in frontend.static_notice("the figure")


def test_live_figure_kind_follows_the_mode():
    assert isinstance(plots.live_metrics_figure(["objective"], widget=True), go.FigureWidget)
    fig = plots.live_metrics_figure(["objective"], widget=False)
    assert type(fig) is go.Figure
    assert type(plots.live_metrics_figure(["objective"])) is go.Figure  # auto, outside a kernel


def test_plain_live_figure_is_redrawn_in_place(kernel):
    h = train_ufm(UFMConfig(num_classes=3, n_per_class=4, feature_dim=4), 40, 10, progress=False)
    fig = frontend.show_live(plots.live_metrics_figure(["objective"], widget=False), min_interval_s=0)
    assert len(kernel.shown) == 1 and kernel.shown[0].layout == fig.layout and len(kernel.handles) == 1
    for k in range(1, len(h.records) + 1):
        plots.update_live_figure(fig, h.records[:k], ["objective"])
    handle = kernel.handles[0]
    assert len(handle.updates) == len(h.records)  # one redraw per update, no throttling asked
    # throttled: updates in quick succession are not redrawn, the final state is drawn by finish_live
    slow = frontend.show_live(plots.live_metrics_figure(["objective"], widget=False), min_interval_s=3600)
    for k in range(1, len(h.records) + 1):
        plots.update_live_figure(slow, h.records[:k], ["objective"])
    assert kernel.handles[1].updates == []
    frontend.finish_live(slow)
    final = kernel.handles[1].updates[-1]
    assert type(final) is go.Figure and list(final.data[0].y) == [r["objective"] for r in h.records]


def test_finish_live_replaces_a_widget_by_a_plain_figure(kernel):
    fig = frontend.show_live(plots.live_metrics_figure(["objective"], widget=True))
    plots.update_live_figure(fig, [{"step": 0, "objective": 1.0}, {"step": 5, "objective": 0.5}], ["objective"])
    assert kernel.handles[0].updates == []  # a FigureWidget redraws itself
    frontend.finish_live(fig)
    final = kernel.handles[0].updates[-1]
    assert type(final) is go.Figure and list(final.data[0].y) == [1.0, 0.5]


def test_train_ufm_live_without_widgets_ends_on_a_plain_figure(static_kernel):
    kernel = static_kernel
    h = train_ufm(UFMConfig(num_classes=3, n_per_class=4, feature_dim=4), 60, 10, progress=False, live=True,
                  live_keys=["objective"])
    assert len(kernel.shown) == 1 and type(kernel.shown[0]) is go.Figure
    final = kernel.handles[0].updates[-1]
    assert type(final) is go.Figure and list(final.data[0].y) == [r["objective"] for r in h.records]


def test_train_live_plot_without_widgets(static_kernel):
    kernel = static_kernel
    from nc_lib.train import live_plot

    cb = live_plot(keys=("train_error",), log_y=False)
    for epoch, err in enumerate([0.5, 0.2, 0.1], start=1):
        cb({"epoch": epoch, "train_error": err})
    assert type(kernel.shown[0]) is go.Figure
    assert list(kernel.handles[0].updates[-1].data[0].y) == [0.5, 0.2, 0.1]


def test_explorers_print_one_line_and_show_their_default_figures(static_kernel, capsys):
    kernel = static_kernel
    from nc_lib import widgets

    etf = widgets.EtfExplorer(C=4)
    etf._ipython_display_()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Widgets cannot render here") and "JupyterLab" in out[0]
    assert "equinorm" in out[1]
    assert type(kernel.shown[-1]) is go.Figure and "C = 4" in kernel.shown[-1].layout.title.text

    kernel.shown.clear()
    ex = widgets.ufm_explorer(C=3, d=4, n=4, steps=40, measure_every=10)
    out = capsys.readouterr().out
    assert out.startswith("Widgets cannot render here") and "Done in" in out
    live, animation = kernel.shown
    assert type(live) is go.Figure and live.layout == ex.live_figure.layout
    assert animation is ex.figures["animation"] and len(animation.frames) == 5
    final = kernel.handles[0].updates[-1]
    assert list(final.data[0].y) == [r["objective"] for r in ex.history.records]


def test_show_controls_falls_back_to_the_figure(static_kernel, capsys):
    kernel = static_kernel
    import ipywidgets as W

    from nc_lib import widgets

    fig = go.FigureWidget(go.Figure(go.Scatter(x=[0, 1], y=[1, 0])))
    widgets.show_controls(W.HBox([W.IntSlider()]), fig)
    assert "JupyterLab" in capsys.readouterr().out
    assert type(kernel.shown[-1]) is go.Figure and list(kernel.shown[-1].data[0].y) == [1, 0]
    frontend.set_widget_mode(True)
    widgets.show_controls(W.HBox([W.IntSlider()]), fig)
    assert isinstance(kernel.shown[-1], W.VBox) and kernel.shown[-1].children[1] is fig


# --------------------------------------------------------------------------- the notebooks' first cells
def _cells(nb_path):
    import json

    return json.loads(nb_path.read_text(encoding="utf-8"))["cells"]


def test_every_notebook_opens_with_how_to_run_it():
    from nc_lib.figures import notebooks

    for path in notebooks():
        cells = _cells(path)
        first = cells[0]
        assert first["cell_type"] == "markdown" and "nc-open-in" in first["metadata"].get("tags", []), path.name
        text = "".join(first["source"])
        assert "make lab" in text and "pip install -e ." in text and "Binder" in text and path.name in text
        code = [c for c in cells if c["cell_type"] == "code"]
        assert "nc-install-check" in code[0]["metadata"].get("tags", []), f"{path.name}: first code cell"


def test_install_check_says_how_to_install_instead_of_a_traceback(monkeypatch, capsys):
    """The first code cell, run in IPython where nc_lib cannot be imported: one line, no ModuleNotFoundError."""
    from IPython.core.interactiveshell import InteractiveShell

    import nc_lib as kit
    from nc_lib.figures import notebooks

    source = "".join(next(c for c in _cells(notebooks()[0]) if c["cell_type"] == "code")["source"])
    monkeypatch.setitem(sys.modules, "nc_lib", None)  # import nc_lib now raises ModuleNotFoundError
    shell = InteractiveShell.instance()
    result = shell.run_cell(source)
    out = capsys.readouterr()
    assert type(result.error_in_exec).__name__ == "KitNotInstalled"  # Run All stops here
    assert [line for line in out.out.splitlines() if line.strip()] == [
        "nc_lib is not installed: from a clone of the kit run `pip install -e .` (or `make lab`), then restart the kernel."]
    assert "ModuleNotFoundError" not in out.out + out.err and "Traceback" not in out.out + out.err
    monkeypatch.setitem(sys.modules, "nc_lib", kit)
    try:
        assert shell.run_cell(source).success  # with the kit installed the cell does nothing
    finally:
        InteractiveShell.clear_instance()  # no IPython shell left behind for the tests that follow
