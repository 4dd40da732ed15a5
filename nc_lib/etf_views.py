"""Pictures of the simplex ETF and an explorer for it (notebook 00).

* :func:`etf_coordinates` places C vectors in 2-D (C = 3), 3-D (C = 4) or, beyond, a fixed 3-D
  projection of the (C-1)-dim subspace they span, so a picture never jumps between redraws.
* :func:`etf_figure` draws the vertices as arrows from the origin with the simplex's edges, optional
  feature clouds around them, and beside it the Gram matrix of cosines as a heatmap.
* :class:`EtfExplorer` is the classroom widget: a slider for C, a toggle for random class means,
  and the measurements shown live.
"""
from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from . import etf
from .validation import check_int

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f"]


def colour(c: int) -> str:
    return COLOURS[c % len(COLOURS)]


def projection_basis(V: Tensor, dims: int = 3) -> Tensor:
    """An orthonormal (p x dims) basis: the top principal directions of the rows of V.

    For an exact ETF every direction of its span is principal; ties are broken by a QR of the
    centred rows, which is deterministic, so redraws do not jump."""
    V = V.to(torch.float64)
    q, r = torch.linalg.qr(V.T)  # p x C; columns span the rows' space in a fixed order
    U, S, Vh = torch.linalg.svd(V @ q, full_matrices=False)
    return q @ Vh.T[:, :dims]


def etf_coordinates(V: Tensor, basis: Tensor | None = None) -> Tensor:
    """Rows of V in 2-D (C = 3, the plane of the triangle), else 3-D, using ``basis`` if given."""
    C = V.shape[0]
    if basis is None:
        basis = projection_basis(V, 2 if C == 3 else 3)
    return V.to(torch.float64) @ basis


def measurements_table(V: Tensor) -> dict[str, float]:
    """The four ETF checks of :mod:`nc_lib.etf` for the rows of V."""
    return {
        "equinorm": etf.equinorm(V),
        "equiangularity": etf.equiangularity(V),
        "maximal angle": etf.maximal_angle(V),
        "distance to ETF Gram": etf.gram_distance_to_etf(V),
    }


def _vertex_traces(P: Tensor, name: str, dash: str | None, show_edges: bool, legend: bool = True,
                   size: int = 7) -> list[go.BaseTraceType]:
    C, k = P.shape
    traces: list[go.BaseTraceType] = []
    three_d = k == 3
    Scatter = go.Scatter3d if three_d else go.Scatter
    if show_edges:
        ex, ey, ez = [], [], []
        for a in range(C):
            for b in range(a + 1, C):
                ex += [float(P[a, 0]), float(P[b, 0]), None]
                ey += [float(P[a, 1]), float(P[b, 1]), None]
                if three_d:
                    ez += [float(P[a, 2]), float(P[b, 2]), None]
        kw = dict(x=ex, y=ey, mode="lines", line=dict(color="rgba(80,80,80,0.5)", width=2),
                  name="simplex edges", hoverinfo="skip", showlegend=legend)
        if three_d:
            kw["z"] = ez
        traces.append(Scatter(**kw))
    for c in range(C):
        xs, ys = [0.0, float(P[c, 0])], [0.0, float(P[c, 1])]
        kw = dict(x=xs, y=ys, mode="lines+markers", name=f"{name} {c}", legendgroup=name,
                  showlegend=legend and c == 0,
                  line=dict(color=colour(c), width=5 if three_d else 3, dash=dash),
                  marker=dict(size=[0, size], color=colour(c)))
        if three_d:
            kw["z"] = [0.0, float(P[c, 2])]
        if legend and c == 0:
            kw["name"] = name
        traces.append(Scatter(**kw))
    return traces


def etf_figure(C: int = 4, d: int | None = None, *, means: Tensor | None = None, features_per_class: int = 0,
               spread: float = 0.08, seed: int = 0, title: str | None = None) -> go.Figure:
    """The simplex ETF of C classes as classifier rows, with class means (``means`` rows, or the ETF
    itself scaled to 0.8) and optional feature clouds of relative size ``spread`` around them, and
    the Gram matrix of the means' cosines beside it."""
    C = check_int("C", C, 2)
    E = etf.simplex_etf(C, d)
    M = 0.8 * E if means is None else torch.as_tensor(means, dtype=torch.float64)
    if M.shape[0] != C:
        raise ValueError(f"means must have C={C} rows; got {M.shape[0]}.")
    Mc = M - M.mean(0)
    basis = projection_basis(E if M.shape[1] == E.shape[1] else Mc, 2 if C == 3 else 3)
    PE = etf_coordinates(E, basis) if M.shape[1] == E.shape[1] else None
    PM = etf_coordinates(Mc, basis)
    three_d = PM.shape[1] == 3
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        specs=[[{"type": "scene" if three_d else "xy"}, {"type": "heatmap"}]],
                        subplot_titles=("vectors" + ("" if C <= 4 else f" (3-D projection of a {C - 1}-dim simplex)"),
                                        "Gram matrix of cosines"))
    if PE is not None:
        for tr in _vertex_traces(PE, "classifier w_c", None, show_edges=True):
            fig.add_trace(tr, row=1, col=1)
    if features_per_class > 0:
        g = torch.Generator().manual_seed(seed)
        pts = Mc[:, None, :] + spread * Mc.norm(dim=1).mean() * torch.randn(C, features_per_class, Mc.shape[1],
                                                                             generator=g, dtype=torch.float64) / math.sqrt(Mc.shape[1] / 3)
        P = pts.reshape(-1, Mc.shape[1]) @ basis
        lab = torch.arange(C).repeat_interleave(features_per_class)
        kw = dict(x=P[:, 0].tolist(), y=P[:, 1].tolist(), mode="markers", name="features h",
                  marker=dict(size=3 if three_d else 5, color=[colour(int(c)) for c in lab], opacity=0.35))
        if three_d:
            kw["z"] = P[:, 2].tolist()
        fig.add_trace((go.Scatter3d if three_d else go.Scatter)(**kw), row=1, col=1)
    Scatter = go.Scatter3d if three_d else go.Scatter
    kw = dict(x=PM[:, 0].tolist(), y=PM[:, 1].tolist(), mode="markers", name="class means mu_c - mu_G",
              marker=dict(size=8 if three_d else 14, symbol="diamond", color=[colour(c) for c in range(C)],
                          line=dict(color="black", width=1)))
    if three_d:
        kw["z"] = PM[:, 2].tolist()
    fig.add_trace(Scatter(**kw), row=1, col=1)
    u = Mc / Mc.norm(dim=1, keepdim=True)
    cos = (u @ u.T).numpy()
    fig.add_trace(go.Heatmap(z=cos, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                             x=[f"{c}" for c in range(C)], y=[f"{c}" for c in range(C)],
                             colorbar=dict(title="cos", x=1.02),
                             text=[[f"{v:.2f}" for v in row] for row in cos], texttemplate="%{text}" if C <= 8 else None),
                  row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    if three_d:
        fig.update_scenes(aspectmode="data", xaxis_title="", yaxis_title="", zaxis_title="")
    else:
        fig.update_xaxes(scaleanchor="y", row=1, col=1)
    fig.update_layout(title=title or f"Simplex ETF, C = {C}: pairwise cosine -1/(C-1) = {-1 / (C - 1):.3f}",
                      width=1100, height=560, legend=dict(orientation="h", y=-0.08))
    return fig


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
        return 0.8 * etf.simplex_etf(C)

    def figure(self) -> go.Figure:
        return etf_figure(self.slider.value, means=self.means(), features_per_class=12)

    def _redraw(self, *_: Any) -> None:
        rows = measurements_table(self.means() - self.means().mean(0))
        self.readout.value = ("<b>class means:</b> " + ", ".join(f"{k} = {v:.3g}" for k, v in rows.items())
                              + " &nbsp; (all 0 for a simplex ETF)")
        from IPython.display import display

        self.output.clear_output(wait=True)
        with self.output:
            display(self.figure())
        self.redraws += 1

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
