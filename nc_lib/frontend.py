"""What the notebook front-end can render: plotly ``FigureWidget`` or plain figures redrawn in place.

A ``FigureWidget`` (and every ipywidgets control) needs a *widget manager* in the front-end. JupyterLab and
Notebook 7 have one; Google Colab does not render ``FigureWidget`` (plotly.py#2202,
colab-cdn-widget-manager#51), and nbconvert, papermill, a static site and VS Code without the widget
extension have none: there a widget shows nothing at all. The kit therefore asks :func:`widgets_enabled`:

* ``set_widget_mode(True | False | "auto")`` forces the answer for this Python process;
* else the environment variable ``NC_WIDGETS`` (``1`` on, ``0`` off, ``auto``);
* else "auto": widgets only inside a Jupyter kernel, with ipywidgets importable, and not in Colab.
  (VS Code without the widget extension cannot be told apart from JupyterLab: set ``NC_WIDGETS=0`` there.)

``make figures`` executes the notebooks with ``NC_WIDGETS=0`` (papermill has no widget manager), so the
executed notebooks, and the static site built from them, hold plain figures.

Live figures (:func:`show_live`, :func:`redraw_live`, :func:`finish_live`): in widget mode a
``FigureWidget`` updated in place; otherwise a plain ``go.Figure`` shown with a display id and redrawn
through the IPython ``DisplayHandle.update`` (at most every ``min_interval_s`` seconds, so a fast
training loop does not flood the front-end). :func:`finish_live` draws the last state as a plain figure in
both modes, so the final figure of a training cell renders anywhere (a saved notebook, a static site).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ENV = "NC_WIDGETS"
_ENV_CHOICES = ("1", "0", "auto", "")
_forced: bool | None = None


def set_widget_mode(mode: bool | str) -> None:
    """Force widgets on (True) or off (False) for this process, or go back to "auto" detection."""
    global _forced
    if mode is True or mode is False:
        _forced = mode
    elif mode == "auto":
        _forced = None
    else:
        raise ValueError(f"mode={mode!r} is not valid; choose one of [True, False, 'auto'].")


def in_kernel() -> bool:
    """True inside a Jupyter (IPython) kernel, where ``display`` reaches a front-end."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def _env_mode() -> bool | None:
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _ENV_CHOICES:
        raise ValueError(f"{ENV}={value!r} is not valid; choose one of ['1', '0', 'auto'] (or leave it unset).")
    return {"1": True, "0": False}.get(value)


def widgets_off_reason() -> str | None:
    """Why widgets cannot (or must not) render here, or None when they can."""
    if _forced is not None:
        return None if _forced else "set_widget_mode(False)"
    env = _env_mode()
    if env is not None:
        return None if env else f"{ENV}=0"
    if not in_kernel():
        return "not running in a Jupyter kernel"
    if "google.colab" in sys.modules:
        return "Google Colab does not render plotly FigureWidgets"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "ipywidgets is not installed"
    return None


def widgets_enabled() -> bool:
    """Whether to build ipywidgets and FigureWidgets (see the module docstring for how it is decided)."""
    return widgets_off_reason() is None


def static_notice(what: str) -> str:
    """The one line a widget prints where widgets cannot render."""
    return (f"Widgets cannot render here ({widgets_off_reason() or 'widgets off'}): showing {what} at its defaults. "
            "The controls work in JupyterLab (`make lab`).")


def plain_figure(fig: Any) -> Any:
    """A plain ``go.Figure`` with the content of ``fig`` (a FigureWidget or a Figure; a Figure is returned as is)."""
    import plotly.graph_objects as go

    return go.Figure(fig) if isinstance(fig, go.FigureWidget) else fig


def _bundle(fig: Any) -> dict[str, Any]:
    """The MIME bundle of a plain figure for plotly's current renderer.

    A ``go.Figure`` displays itself through ``pio.show``, which ignores IPython's display ids, so a live
    figure is displayed, and updated, as its bundle (``display(bundle, raw=True, display_id=...)``)."""
    plain = plain_figure(fig)
    bundle = plain._repr_mimebundle_()
    if not bundle:  # a renderer that draws outside the notebook (e.g. "browser"): plotly's own MIME type
        import json

        bundle = {"application/vnd.plotly.v1+json": json.loads(plain.to_json())}
    return bundle


@dataclass
class _Live:
    handle: Any
    min_interval_s: float
    last: float = field(default=0.0)


def show_live(fig: Any, *, min_interval_s: float = 0.25) -> Any:
    """Display ``fig`` (a FigureWidget or a go.Figure) as a live figure and return it.

    Outside a kernel nothing is displayed. A plain figure is then redrawn by :func:`redraw_live` at
    most every ``min_interval_s`` seconds, and by :func:`finish_live` once at the end.
    """
    if min_interval_s < 0:
        raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}.")
    if not in_kernel():
        return fig
    import plotly.graph_objects as go
    from IPython.display import display

    if isinstance(fig, go.FigureWidget):
        handle = display(fig, display_id=True)
    else:
        handle = display(_bundle(fig), raw=True, display_id=True)
    fig._nc_live = _Live(handle, float(min_interval_s), time.monotonic())
    return fig


def redraw_live(fig: Any, *, force: bool = False) -> bool:
    """Redraw a plain live figure shown by :func:`show_live` (a FigureWidget redraws itself). True if redrawn."""
    import plotly.graph_objects as go

    live = getattr(fig, "_nc_live", None)
    if live is None or live.handle is None or isinstance(fig, go.FigureWidget):
        return False
    now = time.monotonic()
    if not force and now - live.last < live.min_interval_s:
        return False
    live.handle.update(_bundle(fig), raw=True)
    live.last = now
    return True


def finish_live(fig: Any) -> None:
    """Draw the final state of a live figure as a plain figure (a FigureWidget's view is replaced by one)."""
    live = getattr(fig, "_nc_live", None)
    if live is None or live.handle is None:
        return
    live.handle.update(_bundle(fig), raw=True)
    live.last = time.monotonic()
