"""Plots for training histories: the collapse animation, metric curves, live figures, the UFM diagram.

* :func:`collapse_animation` -- Papyan et al. 2020's Fig. 1 idea on any run with snapshots: features
  (faint) collapse onto their class means, while the means and the classifier rows converge onto
  the simplex ETF, drawn as its edges; 2-D for C = 3, 3-D for C = 4, and for larger C a projection
  onto a fixed 3-D basis (the top principal directions of the *final* centred means) so that frames
  do not jump. Beside it, the Gram matrix of cosines of the centred means moving toward the ETF
  Gram (1 on the diagonal, -1/(C-1) off it).
* :func:`plot_metric_curves` -- a subplot per measurement, a curve per label; median and range
  band over seeds when a label holds several runs; optional vertical markers (e.g. TPT onset) and
  horizontal reference lines (e.g. the theorem's optimal objective).
* :func:`live_metrics_figure` / :func:`update_live_figure` -- a live figure updated while training
  (used by :func:`nc_lib.ufm.train_ufm` with ``live=True``): a plotly FigureWidget where widgets
  render, else a plain figure redrawn in place (:mod:`nc_lib.frontend`; :func:`set_widget_mode`).
* :func:`save_animation` -- an animated figure (``fig.frames``) as a GIF (and an MP4 where an encoder
  is installed) for slides (:mod:`nc_lib.animation`).
* :func:`ufm_diagram` -- the unconstrained features model as a picture (Zhu et al. 2021, Fig. 2).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from . import etf
from .animation import save_animation  # noqa: F401  (re-exported: plots.save_animation)
from .frontend import finish_live, redraw_live, set_widget_mode, show_live, widgets_enabled  # noqa: F401
from .validation import check_int

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f"]

#: Readable names for record keys (anything else is shown as its key).
LABELS: dict[str, str] = {
    "loss": "loss", "objective": "objective f(W, H, b)", "accuracy": "train accuracy",
    "within_class_variability": "NC1: Tr(Σ_W Σ_B⁺)/C", "classifier_etf_distance": "NC2: W to ETF",
    "means_etf_distance": "NC2: means to ETF", "classifier_means_alignment": "NC3: W vs means",
    "bias_offset_norm": "NC4: ||W μ_G + b||", "equinorm_means": "equinorm (means)",
    "equinorm_classifiers": "equinorm (classifiers)", "equiangularity_means": "equiangularity (means)",
    "equiangularity_classifiers": "equiangularity (classifiers)", "max_angle_means": "maximal angle (means)",
    "max_angle_classifiers": "maximal angle (classifiers)", "self_duality": "self-duality",
    "ncc_mismatch": "NCC mismatch", "average_cosine_margin": "average cosine margin",
    "wh_equinorm": "WH-equinorm", "norm_W": "||W||_F", "norm_H": "||H||_F", "norm_b": "||b||",
    "accuracy_test": "test accuracy", "ncc_mismatch_test": "NCC mismatch (test)",
}


def colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def metric_label(key: str) -> str:
    return LABELS.get(key, key)


# --------------------------------------------------------------------------- metric curves
def _records(value: Any) -> list[dict[str, float]]:
    return list(value.records) if hasattr(value, "records") else list(value)


def _runs(value: Any) -> list[list[dict[str, float]]]:
    """One run (a list of record dicts, or an object with .records) or several (a list of those)."""
    if hasattr(value, "records"):
        return [list(value.records)]
    value = list(value)
    if not value:
        return [[]]
    first = value[0]
    if isinstance(first, Mapping):
        return [value]
    return [_records(v) for v in value]


def _aggregate(runs: list[list[dict[str, float]]], x: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x values and the median, min and max of ``key`` over runs at each x (runs lacking an x are skipped there)."""
    table: dict[float, list[float]] = {}
    for recs in runs:
        for r in recs:
            if key in r and x in r and r[key] is not None:
                table.setdefault(float(r[x]), []).append(float(r[key]))
    xs = np.array(sorted(table))
    vals = [np.array(table[v]) for v in xs]
    med = np.array([np.median(v) for v in vals])
    lo = np.array([v.min() for v in vals])
    hi = np.array([v.max() for v in vals])
    return xs, med, lo, hi


def plot_metric_curves(histories: Mapping[str, Any], keys: Sequence[str], *, x: str = "step",
                       log_y: bool | Sequence[str] | Mapping[str, bool] = False, titles: Mapping[str, str] | None = None,
                       vline: float | Mapping[str, float] | None = None, vline_label: str = "",
                       hline: float | Mapping[str, float] | None = None, hline_label: str = "",
                       band: bool = True, cols: int | None = None, x_title: str | None = None,
                       title: str | None = None, height: int | None = None, width: int | None = None,
                       colours: Mapping[str, str] | None = None) -> go.Figure:
    """A subplot per ``keys`` entry, a curve per label of ``histories``.

    ``histories[label]`` is one run (a list of record dicts, or a UFMHistory) or several runs (a
    list of them): several runs are drawn as their median with, if ``band``, a shaded min-max
    range. ``x`` is the record key on the x axis. ``log_y``: True for every subplot, or the keys
    (list, or dict key -> bool) that get a log y axis. ``vline``: one x for a grey dashed line on
    every subplot, or a dict label -> x for a dashed line per curve in its colour (e.g. the onset
    of the terminal phase per network). ``hline``: one y for every subplot or a dict key -> y
    (e.g. the theorem's optimal objective), dotted black.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("keys must name at least one record key to plot.")
    if not histories:
        raise ValueError("histories must hold at least one label -> run(s).")
    if isinstance(log_y, bool):
        logs = {k: log_y for k in keys}
    elif isinstance(log_y, Mapping):
        logs = {k: bool(log_y.get(k, False)) for k in keys}
    else:
        logs = {k: k in set(log_y) for k in keys}
    titles = dict(titles or {})
    n = len(keys)
    cols = check_int("cols", cols, 1) if cols is not None else min(n, 3)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[titles.get(k, metric_label(k)) for k in keys],
                        horizontal_spacing=0.08, vertical_spacing=0.14 if rows > 1 else 0.1)
    runs_by_label = {label: _runs(v) for label, v in histories.items()}
    found_any = False
    for i, key in enumerate(keys):
        r, c = i // cols + 1, i % cols + 1
        for j, (label, runs) in enumerate(runs_by_label.items()):
            col = (colours or {}).get(label, colour(j))
            xs, med, lo, hi = _aggregate(runs, x, key)
            if xs.size == 0:
                continue
            found_any = True
            if band and len(runs) > 1:
                fig.add_trace(go.Scatter(x=xs, y=hi, mode="lines", line=dict(width=0), showlegend=False,
                                         hoverinfo="skip", legendgroup=label), row=r, col=c)
                fig.add_trace(go.Scatter(x=xs, y=lo, mode="lines", line=dict(width=0), fill="tonexty",
                                         fillcolor=_rgba(col, 0.2), showlegend=False, hoverinfo="skip",
                                         legendgroup=label, name=f"{label} range"), row=r, col=c)
            name = label + (f" (median of {len(runs)})" if len(runs) > 1 else "")
            fig.add_trace(go.Scatter(x=xs, y=med, mode="lines", name=name, line=dict(color=col, width=2),
                                     legendgroup=label, showlegend=i == 0), row=r, col=c)
        if logs[key]:
            fig.update_yaxes(type="log", row=r, col=c)
        fig.update_xaxes(title_text=x_title or x, row=r, col=c)
        if hline is not None:
            y0 = hline.get(key) if isinstance(hline, Mapping) else hline
            if y0 is not None:
                ann = dict(annotation_text=hline_label, annotation_position="top right") if hline_label else {}
                fig.add_hline(y=y0, line=dict(color="black", dash="dot", width=1.5), row=r, col=c, **ann)
        if vline is not None:
            if isinstance(vline, Mapping):
                for j, label in enumerate(runs_by_label):
                    if vline.get(label) is not None:
                        fig.add_vline(x=vline[label], line=dict(color=(colours or {}).get(label, colour(j)), dash="dash",
                                                                width=1.5), row=r, col=c)
            else:
                ann = dict(annotation_text=vline_label, annotation_position="top") if vline_label else {}
                fig.add_vline(x=vline, line=dict(color="grey", dash="dash", width=1.5), row=r, col=c, **ann)
    if not found_any:
        raise ValueError(f"none of keys={keys} (with x={x!r}) appears in the records given.")
    fig.update_layout(title=title, height=height or 300 * rows + 130, width=width or min(1250, 420 * cols + 120),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0 + 0.25 / (rows * 3), x=0),
                      margin=dict(t=130))
    return fig


# --------------------------------------------------------------------------- live figure while training
def layer_figure(layers: Mapping[str, Mapping[str, float]], key: str = "within_class_variability", *,
                 log_y: bool = True, title: str | None = None) -> go.Figure:
    """``key`` (default NC1, Tr(Sigma_W Sigma_B^+)/C) against depth: one point per layer, in the order
    given (``layers``: layer name -> its measurements, e.g. ``measure_model(..., layers="all").layers``)."""
    names = [n for n, d in layers.items() if key in d]
    if not names:
        raise ValueError(f"key={key!r} is not measured at any layer; choices: "
                         f"{sorted({k for d in layers.values() for k in d})}.")
    vals = [float(layers[n][key]) for n in names]
    fig = go.Figure(go.Scatter(x=list(range(1, len(names) + 1)), y=vals, mode="lines+markers", text=names,
                               hovertemplate="%{text}: %{y:.4g}<extra></extra>", line=dict(color=colour(0))))
    fig.update_layout(title=title or f"{metric_label(key)} by depth", xaxis_title="layer", yaxis_title=metric_label(key),
                      yaxis_type="log" if log_y and min(vals) > 0 else "linear", height=360,
                      margin=dict(l=50, r=10, t=40, b=90))
    fig.update_xaxes(tickmode="array", tickvals=list(range(1, len(names) + 1)), ticktext=names, tickangle=-45)
    return fig


def live_metrics_figure(keys: Sequence[str], *, x: str = "step", log_y: bool = True,
                        widget: bool | None = None) -> go.FigureWidget | go.Figure:
    """One subplot (log y) per key, to be filled by :func:`update_live_figure`: a FigureWidget if
    ``widget`` (None: :func:`nc_lib.frontend.widgets_enabled`), else a plain figure to be shown with
    :func:`show_live` and redrawn in place."""
    keys = list(keys)
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    base = make_subplots(rows=rows, cols=cols, subplot_titles=[metric_label(k) for k in keys])
    for i, _ in enumerate(keys):
        base.add_trace(go.Scatter(x=[], y=[], mode="lines", line=dict(color=colour(i)), showlegend=False),
                       row=i // cols + 1, col=i % cols + 1)
        if log_y:
            base.update_yaxes(type="log", row=i // cols + 1, col=i % cols + 1)
        base.update_xaxes(title_text=x, row=i // cols + 1, col=i % cols + 1)
    base.update_layout(height=260 * rows + 40, width=min(1250, 300 * cols + 80), margin=dict(t=40, b=40))
    return go.FigureWidget(base) if (widgets_enabled() if widget is None else widget) else base


def update_live_figure(fig: go.FigureWidget | go.Figure, records: Sequence[Mapping[str, float]], keys: Sequence[str],
                       *, x: str = "step") -> None:
    """Set the curves of a :func:`live_metrics_figure` to ``records`` (one batched redraw; a plain
    figure shown with :func:`show_live` is redrawn through its display handle, throttled)."""
    xs = [r[x] for r in records]
    with fig.batch_update():
        for trace, key in zip(fig.data, keys):
            trace.x = xs
            trace.y = [r.get(key) for r in records]
    redraw_live(fig)


# --------------------------------------------------------------------------- the collapse animation
def _snapshots(history: Any) -> list[dict[str, Any]]:
    snaps = list(history.snapshots) if hasattr(history, "snapshots") else list(history)
    if not snaps:
        raise ValueError("the history has no snapshots: train with measure_every <= steps first.")
    for key in ("means", "W", "global_mean", "step"):
        if key not in snaps[0]:
            raise ValueError(f"snapshots must be dicts with keys step, means, W, global_mean (features optional); missing {key!r}.")
    return snaps


def _f64(t: Any) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def projection_basis(centred_means: Tensor, dims: int) -> Tensor:
    """(d x dims) orthonormal basis: the top ``dims`` principal directions of the rows (zero-padded if rank < dims)."""
    M = _f64(centred_means)
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    B = Vh[:dims].T
    # fix the sign of each direction so the largest-magnitude coordinate of the means is positive
    coords = M @ B
    signs = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1
    B = B * signs
    if B.shape[1] < dims:
        B = torch.cat([B, torch.zeros(B.shape[0], dims - B.shape[1], dtype=B.dtype)], 1)
    return B


def nearest_etf_rows(directions: Tensor, num_classes: int) -> Tensor | None:
    """Unit simplex-ETF rows (of a C-class ETF, the first S = rows of ``directions``) closest to the given
    unit directions (S x d), by orthogonal Procrustes; None if d < C-1 (no ETF fits)."""
    V = _f64(directions)
    S, d = V.shape
    C = num_classes
    if d < C - 1:
        return None
    E0 = etf.simplex_etf(C, C - 1)[:S]  # S x (C-1)
    U, _, Vh = torch.linalg.svd(V.T @ E0, full_matrices=False)  # d x (C-1)
    P = U @ Vh  # d x (C-1), orthonormal columns
    return E0 @ P.T


def _cos_gram(V: Tensor) -> np.ndarray:
    u = V / V.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (u @ u.T).numpy()


def collapse_animation(history: Any, *, max_frames: int = 60, show_features: bool = True, title: str | None = None,
                       frame_duration: int = 120, height: int = 620, width: int = 1150) -> go.Figure:
    """Animated collapse from a run's snapshots (a :class:`~nc_lib.ufm.UFMHistory` or a list of snapshot dicts).

    Each frame shows, in a fixed basis (2-D for C = 3 or d = 2, else 3-D: the top principal directions of
    the final centred class means), the centred features (h - mu_G) and class means (mu_c - mu_G),
    both divided by the frame's mean class-mean norm, and the classifier rows w_c divided by their
    mean norm, so both converge onto the unit simplex ETF, drawn as its edges (the ETF nearest the
    final means; none when d < C-1). Right: the cosine Gram matrix of the centred means. Frames:
    at most ``max_frames`` snapshots, evenly spaced, first and last included; play button and
    step slider.
    """
    snaps = _snapshots(history)
    max_frames = check_int("max_frames", max_frames, 2)
    if len(snaps) > max_frames:
        idx = np.unique(np.linspace(0, len(snaps) - 1, max_frames).round().astype(int))
        snaps = [snaps[i] for i in idx]
    final = snaps[-1]
    S, d = _f64(final["means"]).shape
    C = int(final.get("num_classes", S))
    dims = 2 if C <= 3 or d <= 2 else 3
    Mf = _f64(final["means"]) - _f64(final["global_mean"])
    basis = projection_basis(Mf, dims)
    target = nearest_etf_rows(Mf / Mf.norm(dim=1, keepdim=True).clamp_min(1e-300), C)
    three_d = dims == 3
    Scatter = go.Scatter3d if three_d else go.Scatter
    classes = [f"class {c}" for c in range(S)]

    def xyz(P: np.ndarray) -> dict[str, Any]:
        out = {"x": P[:, 0], "y": P[:, 1]}
        if three_d:
            out["z"] = P[:, 2]
        return out

    def frame_traces(snap: dict[str, Any]) -> list[Any]:
        mu_G = _f64(snap["global_mean"])
        Mc = _f64(snap["means"]) - mu_G
        scale_m = float(Mc.norm(dim=1).mean().clamp_min(1e-300))
        Wr = _f64(snap["W"])
        scale_w = float(Wr.norm(dim=1).mean().clamp_min(1e-300))
        PM = ((Mc / scale_m) @ basis).numpy()
        PW = ((Wr / scale_w) @ basis).numpy()
        out = []
        if show_features:
            feats = snap.get("features")
            if feats is not None and len(feats):
                PF = (((_f64(feats) - mu_G) / scale_m) @ basis).numpy()
                lab = torch.as_tensor(snap["feature_labels"]).tolist()
                out.append(Scatter(**xyz(PF), mode="markers", name="features h_i",
                                   marker=dict(size=2.5 if three_d else 5, color=[colour(c) for c in lab], opacity=0.3)))
            else:
                out.append(Scatter(**xyz(np.zeros((0, dims))), mode="markers", name="features h_i"))
        out.append(Scatter(**xyz(PM), mode="markers", name="class means μ_c - μ_G",
                           marker=dict(size=7 if three_d else 13, color=[colour(c) for c in range(S)],
                                       line=dict(color="black", width=1))))
        seg = np.full((3 * S, dims), np.nan)
        seg[1::3] = PW
        seg[0::3] = 0.0
        seg_kw = xyz(seg)
        out.append(Scatter(**seg_kw, mode="lines", name="classifier rows w_c", line=dict(color="rgba(0,0,0,0.55)", width=3),
                           hoverinfo="skip", connectgaps=False))
        out.append(Scatter(**xyz(PW), mode="markers", name="w_c tips", showlegend=False,
                           marker=dict(size=6 if three_d else 12, symbol="diamond" if three_d else "diamond-open",
                                       color=[colour(c) for c in range(S)], line=dict(color="black", width=2))))
        G = _cos_gram(Mc)
        out.append(go.Heatmap(z=G, x=classes, y=classes, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                              showscale=True, colorbar=dict(title="cos", x=1.0, len=0.8), name="cosine Gram"))
        return out

    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38],
                        specs=[[{"type": "scene" if three_d else "xy"}, {"type": "heatmap"}]],
                        subplot_titles=(
                            "features, class means, classifier rows" + (f" (3-D view of {C - 1}-dim space)" if C > 4 and d > 2 else ""),
                            f"cosines of centred class means (ETF: {-1 / (C - 1):.3f} off-diagonal)"))
    static = 0
    if target is not None:
        PE = (target @ basis).numpy()
        pts: list[list[float]] = []
        for a in range(S):
            for b in range(a + 1, S):
                pts += [list(PE[a]), list(PE[b]), [np.nan] * dims]
        fig.add_trace(Scatter(**xyz(np.array(pts) if pts else np.zeros((0, dims))), mode="lines",
                              name="simplex ETF (target)", line=dict(color="rgba(90,90,90,0.6)", width=2, dash="dot"),
                              hoverinfo="skip"), row=1, col=1)
        static = 1
    first = frame_traces(snaps[0])
    for tr in first[:-1]:
        fig.add_trace(tr, row=1, col=1)
    fig.add_trace(first[-1], row=1, col=2)
    animated = list(range(static, static + len(first)))
    frames = []
    for snap in snaps:
        frames.append(go.Frame(data=frame_traces(snap), traces=animated, name=str(int(snap["step"]))))
    fig.frames = frames
    # fixed axes over all frames, so nothing jumps
    lim = 1.35
    if three_d:
        ax = dict(range=[-lim, lim], showticklabels=False, title="")
        fig.update_scenes(xaxis=ax, yaxis=ax, zaxis=ax, aspectmode="cube")
    else:
        fig.update_xaxes(range=[-lim, lim], row=1, col=1, zeroline=False)
        fig.update_yaxes(range=[-lim, lim], row=1, col=1, scaleanchor="x", scaleratio=1, zeroline=False)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    slider_steps = [dict(method="animate", label=f.name,
                         args=[[f.name], {"frame": {"duration": 0, "redraw": True}, "mode": "immediate",
                                          "transition": {"duration": 0}}]) for f in frames]
    fig.update_layout(
        title=title or f"Neural collapse on the UFM (C = {C}{'' if S == C else f', first {S} classes shown'})",
        height=height, width=width, legend=dict(orientation="h", yanchor="bottom", y=1.07, x=0),
        updatemenus=[dict(type="buttons", direction="left", x=0.0, y=-0.02, xanchor="left", yanchor="top",
                          pad=dict(t=40, r=10), showactive=False, buttons=[
                              dict(label="▶ play", method="animate",
                                   args=[None, {"frame": {"duration": frame_duration, "redraw": True},
                                                "fromcurrent": True, "transition": {"duration": 0}}]),
                              dict(label="❚❚ pause", method="animate",
                                   args=[[None], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate",
                                                  "transition": {"duration": 0}}])])],
        sliders=[dict(active=0, steps=slider_steps, x=0.12, len=0.85, y=-0.02, yanchor="top",
                      currentvalue=dict(prefix="step "), pad=dict(t=30))],
        margin=dict(b=110, t=120),
    )
    return fig


# --------------------------------------------------------------------------- the UFM as a picture
def ufm_diagram(num_classes: int = 3, width: int = 1150, height: int = 560) -> go.Figure:
    """Zhu et al. 2021, Fig. 2, redrawn with plotly shapes: a deep network x -> phi_theta(x) -> W h + b
    (top), and the UFM (bottom), where the body is replaced by free variables h_i optimised directly."""
    C = check_int("num_classes", num_classes, 2)
    fig = go.Figure()
    shapes: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []

    def box(x0: float, y0: float, x1: float, y1: float, fill: str, text: str, line: str = "black", dash: str = "solid",
            size: int = 14) -> None:
        shapes.append(dict(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, fillcolor=fill, line=dict(color=line, width=2, dash=dash),
                           layer="below"))
        notes.append(dict(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False, font=dict(size=size)))

    def arrow(x0: float, y0: float, x1: float, y1: float, colour_: str = "black") -> None:
        notes.append(dict(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", text="", showarrow=True,
                          arrowhead=3, arrowsize=1.3, arrowwidth=2, arrowcolor=colour_))

    # top: a deep network
    notes.append(dict(x=0.2, y=9.6, text="<b>Deep network</b>", showarrow=False, xanchor="left", font=dict(size=16)))
    box(0.2, 6.4, 1.6, 8.6, "#f2f2f2", "input<br>x<sub>i</sub>")
    for k in range(4):  # the body: layers as trapezoid-ish stacked boxes
        x0 = 2.3 + 0.75 * k
        shapes.append(dict(type="path", path=f"M {x0},{6.2 + 0.25 * k} L {x0 + 0.55},{6.45 + 0.25 * k} "
                                             f"L {x0 + 0.55},{8.55 - 0.25 * k} L {x0},{8.8 - 0.25 * k} Z",
                           fillcolor="#c6dbef", line=dict(color="#3b6ea5", width=2)))
    notes.append(dict(x=3.7, y=5.75, text="body φ<sub>θ</sub> (all layers but the last)", showarrow=False, font=dict(size=13)))
    arrow(1.65, 7.5, 2.25, 7.5)
    arrow(5.4, 7.5, 6.1, 7.5)
    box(6.2, 6.6, 7.9, 8.4, "#fdd0a2", "h<sub>i</sub> = φ<sub>θ</sub>(x<sub>i</sub>) ∈ R<sup>d</sup>")
    arrow(7.95, 7.5, 8.6, 7.5)
    box(8.7, 6.6, 10.5, 8.4, "#c7e9c0", "W h<sub>i</sub> + b<br>(C = %d logits)" % C)
    arrow(10.55, 7.5, 11.2, 7.5)
    box(11.3, 6.6, 13.2, 8.4, "#fcbba1", "CE(·, y<sub>i</sub>)")
    # the replacement
    notes.append(dict(x=7.3, y=5.0, xanchor="left", text="<b>unconstrained features:</b> a very expressive body can<br>"
                      "output any h<sub>i</sub>, so treat the h<sub>i</sub> as free variables",
                      showarrow=False, font=dict(size=13, color="#a63603"), align="left"))
    arrow(7.05, 6.5, 7.05, 4.2, "#a63603")
    # bottom: the UFM
    notes.append(dict(x=0.2, y=4.2, text="<b>Unconstrained features model</b>", showarrow=False, xanchor="left", font=dict(size=16)))
    box(0.2, 0.9, 5.4, 3.3, "#f7f7f7", "network body removed", line="#999999", dash="dot", size=13)
    shapes.append(dict(type="line", x0=0.4, y0=1.05, x1=5.2, y1=3.15, line=dict(color="#bbbbbb", width=2)))
    # feature matrix H as a grid of free columns
    n_cols = 6
    for j in range(n_cols):
        x0 = 5.9 + 0.33 * j
        shapes.append(dict(type="rect", x0=x0, y0=0.9, x1=x0 + 0.28, y1=3.3, fillcolor=COLOURS[(j // 2) % C],
                           opacity=0.55, line=dict(color="black", width=1)))
    notes.append(dict(x=6.9, y=3.6, text="free H = [h<sub>1</sub> … h<sub>N</sub>] ∈ R<sup>d×N</sup>", showarrow=False, font=dict(size=13)))
    notes.append(dict(x=6.9, y=0.55, text="n per class, coloured by label", showarrow=False, font=dict(size=11)))
    arrow(7.95, 2.1, 8.6, 2.1)
    box(8.7, 1.2, 10.5, 3.0, "#c7e9c0", "W h<sub>i</sub> + b")
    arrow(10.55, 2.1, 11.2, 2.1)
    box(11.3, 1.2, 13.2, 3.0, "#fcbba1", "CE(·, y<sub>i</sub>)")
    notes.append(dict(x=6.7, y=-0.45, showarrow=False, font=dict(size=15),
                      text="min<sub>W, H, b</sub>  (1/N) Σ<sub>i</sub> CE(W h<sub>i</sub> + b, y<sub>i</sub>) + "
                           "λ<sub>W</sub>/2 ||W||² + λ<sub>H</sub>/2 ||H||² + λ<sub>b</sub>/2 ||b||²"))
    fig.update_layout(shapes=shapes, annotations=notes, width=width, height=height, plot_bgcolor="white",
                      xaxis=dict(range=[0, 13.5], visible=False), yaxis=dict(range=[-0.9, 10], visible=False),
                      margin=dict(l=10, r=10, t=60, b=10),
                      title="The unconstrained features model (after Zhu et al. 2021, Fig. 2)")
    return fig


# --------------------------------------------------------------------------- the simplex ETF itself (notebook 00)
def etf_measurements(V: Tensor) -> dict[str, float]:
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
    basis = projection_basis(E if M.shape[1] == E.shape[1] else Mc, min(C - 1, 3) if C <= 3 else 3)
    PE = E @ basis if M.shape[1] == E.shape[1] else None
    PM = Mc @ basis
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
