"""Markou et al. (2024)'s figures and tables, built from finished runs (Figs. 1-5, appendix panels, Tables 1-3)."""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...plots import colour, plot_metric_curves
from ...validation import check_choice
from .grid import LABELS, MAIN_METHODS

#: the panels of Fig. 2: record key -> title
PANELS = {"loss": "CE loss", "average_cosine_margin": "average cosine margin", "pcm": "PCM at end (sorted)",
          "within_class_variability": "NC1", "classifier_means_alignment": "NC3", "wh_equinorm": "WH-equinorm"}
LOG_PANELS = ("loss", "within_class_variability", "classifier_means_alignment", "wh_equinorm")


def _runs_records(results: dict[str, list[dict[str, Any]]], methods: Sequence[str]) -> dict[str, list]:
    return {LABELS[m]: [r["records"] for r in results[m]] for m in methods if m in results}


def figure_panels(results: dict[str, list[dict[str, Any]]], *, methods: Sequence[str] | None = None,
                  extra_keys: Sequence[str] = (), title: str = "", x_title: str = "iteration") -> go.Figure:
    """Markou's panel set (Fig. 2): CE loss, average cosine margin, PCM at the end (sorted margins vs sample
    index), NC1, NC3, WH-equinorm, plus ``extra_keys`` (e.g. train/test top-1); a curve per method, the
    median over seeds with the min-max range shaded."""
    methods = [m for m in (methods or list(results)) if m in results]
    if not methods:
        raise ValueError(f"results hold none of the methods; have {sorted(results)}.")
    keys = [k for k in PANELS if k != "pcm"] + list(extra_keys)
    curves = plot_metric_curves(_runs_records(results, methods), keys, x="step", log_y=list(LOG_PANELS),
                                titles={**PANELS, "accuracy": "train top-1", "accuracy_test": "test top-1"},
                                x_title=x_title, cols=3)
    order = list(PANELS) + list(extra_keys)
    n = len(order)
    cols = 3
    rows = math.ceil(n / cols)
    titles = [{**PANELS, "accuracy": "train top-1", "accuracy_test": "test top-1"}[k] for k in order]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=0.18)
    # copy the curves of plot_metric_curves into our layout (keys in its order -> our position)
    axis_of = {}
    for i, k in enumerate(keys):
        axis_of["" if i == 0 else str(i + 1)] = k
    for tr in curves.data:
        suffix = (tr.xaxis or "x")[1:]
        k = axis_of[suffix]
        pos = order.index(k)
        fig.add_trace(tr, row=pos // cols + 1, col=pos % cols + 1)
    for i, k in enumerate(order):
        r, c = i // cols + 1, i % cols + 1
        if k in LOG_PANELS:
            fig.update_yaxes(type="log", row=r, col=c)
        fig.update_xaxes(title_text="sample (sorted)" if k == "pcm" else x_title, row=r, col=c)
    # PCM: sorted per-sample margins at the end, median and range over seeds
    pr, pc = order.index("pcm") // cols + 1, order.index("pcm") % cols + 1
    for j, m in enumerate(methods):
        pcms = [np.asarray(r["pcm"]) for r in results[m] if "pcm" in r]
        if not pcms:
            continue
        P = np.stack(pcms)
        xs = np.arange(P.shape[1])
        col = colour(j)  # plot_metric_curves colours labels in order
        fig.add_trace(go.Scatter(x=xs, y=np.median(P, 0), mode="lines", line=dict(color=col), name=LABELS[m],
                                 legendgroup=LABELS[m], showlegend=False), row=pr, col=pc)
        if P.shape[0] > 1:
            fig.add_trace(go.Scatter(x=np.r_[xs, xs[::-1]], y=np.r_[P.max(0), P.min(0)[::-1]], fill="toself",
                                     line=dict(width=0), fillcolor=col, opacity=0.2, hoverinfo="skip",
                                     showlegend=False, legendgroup=LABELS[m]), row=pr, col=pc)
    fig.update_layout(title=title, height=330 * rows, width=1150, template="plotly_white")
    return fig


def figure_accuracy_vs_classes(ufm_results: dict[str, dict[str, list[dict[str, Any]]]], *,
                               methods: Sequence[str] = MAIN_METHODS) -> go.Figure:
    """Fig. 3: UFM top-1 training accuracy over iterations, a panel per C (10, 100, 200, 1000)."""
    names = sorted(ufm_results, key=lambda s: int(s.replace("ufm", "")))
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[f"UFM-{n[3:]}" for n in names])
    for i, name in enumerate(names):
        sub = plot_metric_curves(_runs_records(ufm_results[name], methods), ["accuracy"], x="step")
        for tr in sub.data:
            tr.showlegend = (i == 0) and tr.showlegend is not False
            fig.add_trace(tr, row=1, col=i + 1)
        fig.update_xaxes(title_text="iteration", row=1, col=i + 1)
    fig.update_yaxes(title_text="train top-1", row=1, col=1)
    fig.update_layout(height=380, width=300 * len(names) + 150, template="plotly_white",
                      title="UFM top-1 accuracy as C grows")
    return fig


def first_full_accuracy(ufm_results: dict[str, dict[str, list[dict[str, Any]]]], *,
                        methods: Sequence[str] = MAIN_METHODS) -> dict[str, dict[str, float | None]]:
    """``{setting: {method: median over seeds of the first measured iteration with 100% train accuracy}}``
    (None where a seed never gets there): the number Fig. 3 is about."""
    out: dict[str, dict[str, float | None]] = {}
    for name, by_method in ufm_results.items():
        out[name] = {}
        for m in methods:
            if m not in by_method:
                continue
            steps = [next((r["step"] for r in run["records"] if r["accuracy"] >= 1.0), None) for run in by_method[m]]
            out[name][m] = None if None in steps else float(statistics.median(steps))
    return out


def accuracy_note(ufm_results: dict[str, dict[str, list[dict[str, Any]]]], *,
                  methods: Sequence[str] = MAIN_METHODS) -> str:
    """Fig. 3's finding in words, from the runs: when each head first reaches 100% train accuracy per C."""
    first = first_full_accuracy(ufm_results, methods=methods)
    parts = []
    for name in sorted(first, key=lambda s: int(s.replace("ufm", ""))):
        steps = ", ".join(f"{LABELS[m]} {'never' if v is None else f'{v:g}'}" for m, v in first[name].items())
        parts.append(f"UFM-{name[3:]}: {steps}")
    return "First measured iteration with 100% train accuracy (median over seeds): " + "; ".join(parts) + "."


def figure_schematic() -> go.Figure:
    """Fig. 1: CNN -> features -> normalised means -> nearest-ETF node -> W = U* M, with the two gradient
    paths (through the features directly, and through the node), drawn with plotly shapes."""
    fig = go.Figure()

    def box(x0: float, x1: float, y0: float, y1: float, text: str, fill: str) -> None:
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line=dict(color="black"), fillcolor=fill,
                      layer="below")
        fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False, font=dict(size=13))

    def arrow(x0: float, y0: float, x1: float, y1: float, col: str = "black", dash: bool = False,
              text: str = "") -> None:
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                           arrowhead=3, arrowsize=1.3, arrowwidth=2.5 if not dash else 2, arrowcolor=col, text="")
        if text:
            fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2 + 0.22, text=text, showarrow=False,
                               font=dict(size=11, color=col))

    box(0.0, 1.4, 1.5, 3.0, "CNN<br>f(x; θ)", "#dbe9f6")
    box(2.0, 3.4, 1.5, 3.0, "features h<br>h ← τ h/‖h‖", "#e8f4e0")
    box(4.0, 5.6, 3.2, 4.6, "normalised means<br>H̄ = H_t/‖H_t‖<br>(running average)", "#fff2cc")
    box(6.2, 7.8, 3.2, 4.6, "nearest-ETF node<br>U* = argmin ‖H̄ − U M̃‖²<br>+ δ/2 ‖U − U_prox‖²", "#fde0dd")
    box(8.4, 9.9, 3.2, 4.6, "classifier<br>W = (U* M)ᵀ<br>b = −W μ_G", "#eadcf8")
    box(8.4, 9.9, 0.3, 1.7, "logits W h + b<br>→ CE loss", "#f2f2f2")
    arrow(1.4, 2.25, 2.0, 2.25)
    arrow(3.4, 2.6, 4.0, 3.9)
    arrow(5.6, 3.9, 6.2, 3.9)
    arrow(7.8, 3.9, 8.4, 3.9)
    arrow(9.15, 3.2, 9.15, 1.7)
    arrow(3.4, 1.9, 8.4, 1.0)
    # gradient paths (backward): red = direct through features, purple = through the node
    arrow(8.4, 0.55, 3.4, 1.55, col="#d62728", text="∂L/∂h (direct path)")
    arrow(7.0, 5.2, 3.0, 5.2, col="#9467bd", text="∂L/∂H̄ through the node (implicit differentiation)")
    fig.add_shape(type="line", x0=9.15, y0=4.6, x1=9.15, y1=5.2, line=dict(color="#9467bd", width=2, dash="dot"))
    fig.add_shape(type="line", x0=9.15, y0=5.2, x1=7.0, y1=5.2, line=dict(color="#9467bd", width=2, dash="dot"))
    fig.add_shape(type="line", x0=3.0, y0=5.2, x1=2.7, y1=3.0, line=dict(color="#9467bd", width=2, dash="dot"))
    fig.add_annotation(x=4.8, y=0.2, text="M = √(C/(C−1)) (I − 11ᵀ/C),  M̃ = (I − 11ᵀ/C)/√(C−1)",
                       showarrow=False, font=dict(size=12))
    fig.update_xaxes(visible=False, range=[-0.2, 10.1])
    fig.update_yaxes(visible=False, range=[-0.1, 5.8])
    fig.update_layout(width=1150, height=480, template="plotly_white", title="The implicit ETF classifier",
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


def figure_cost(cost: dict[str, dict[str, Any]], *, title: str = "") -> go.Figure:
    """Fig. 5: (a) forward time per method (box of per-step times; the implicit heads' mean and median
    marked), (b) forward and backward time per method (median, bars)."""
    methods = list(cost)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["(a) forward time per step", "(b) forward and backward time"])
    for j, m in enumerate(methods):
        ms = 1e3 * np.asarray(cost[m]["forward_s"])
        fig.add_trace(go.Box(y=ms, name=LABELS.get(m, m), marker_color=colour(j), showlegend=False, boxmean=True),
                      row=1, col=1)
        if m.startswith("implicit"):
            for stat, val, pos in (("mean", ms.mean(), "top right"), ("median", np.median(ms), "bottom right")):
                fig.add_trace(go.Scatter(x=[LABELS.get(m, m)], y=[val], mode="markers+text", text=[f"{stat} {val:.2f}"],
                                         textposition=pos, marker=dict(symbol="line-ew-open", size=22, color="black"),
                                         textfont=dict(size=10), showlegend=False), row=1, col=1)
    names = [LABELS.get(m, m) for m in methods]
    fig.add_trace(go.Bar(x=names, y=[1e3 * float(np.median(cost[m]["forward_s"])) for m in methods], name="forward"),
                  row=1, col=2)
    fig.add_trace(go.Bar(x=names, y=[1e3 * float(np.median(cost[m]["backward_s"])) for m in methods], name="backward"),
                  row=1, col=2)
    fig.update_layout(barmode="stack", height=450, width=1150, template="plotly_white", title=title)
    fig.update_yaxes(title_text="ms (log)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="ms (median per step)", row=1, col=2)
    return fig


def figure_cost_settings(costs: dict[str, dict[str, dict[str, Any]]]) -> go.Figure:
    """Appendix cost: a panel per setting, forward + backward median time per method (stacked bars)."""
    names = list(costs)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
    for i, s in enumerate(names):
        ms = list(costs[s])
        labels = [LABELS.get(m, m) for m in ms]
        for part, col in (("forward_s", "#1f77b4"), ("backward_s", "#ff7f0e")):
            fig.add_trace(go.Bar(x=labels, y=[1e3 * float(np.median(costs[s][m][part])) for m in ms],
                                 name=part.split("_")[0], marker_color=col, showlegend=(i == 0)), row=1, col=i + 1)
    fig.update_layout(barmode="stack", height=480, width=420 * len(names) + 100, template="plotly_white")
    fig.update_yaxes(title_text="ms per step (median)", row=1, col=1)
    return fig


# =========================================================================== tables
def _median_range(vals: Sequence[float]) -> str:
    v = [100 * x for x in vals]
    return f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]"


def _at_epoch(records: list[dict[str, Any]], epoch: int, key: str) -> float:
    best = min(records, key=lambda r: abs(r["step"] - epoch))
    return float(best[key])


def accuracy_table(real_results: dict[str, dict[str, list[dict[str, Any]]]], grid: dict[str, dict[str, Any]],
                   key: str = "accuracy") -> list[dict[str, Any]]:
    """Tables 1 (``key="accuracy"``, train) and 2 (``"accuracy_test"``): per setting and method, top-1 (%) at
    the report epochs, median [min, max] over seeds."""
    check_choice("key", key, ("accuracy", "accuracy_test"))
    rows = []
    for name, res in real_results.items():
        e = grid[name]
        for m, runs in res.items():
            row = {"setting": e["stands_for"], "run": f"{e['dataset']} {e['model']}", "method": LABELS[m]}
            for ep in e["report_epochs"]:
                row[f"epoch {ep}"] = _median_range([_at_epoch(r["records"], ep, key) for r in runs])
            rows.append(row)
    return rows


def memory_table(memories: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Table 3 rows: per setting and method, measured memory in MiB (saved-for-backward, of it the head's,
    total with parameters and gradients)."""
    rows = []
    for s, mem in memories.items():
        for m, v in mem.items():
            rows.append({"setting": s, "method": LABELS.get(m, m),
                         "saved for backward (MiB)": round(v["saved_bytes"] / 2 ** 20, 3),
                         "of which head (MiB)": round(v["head_saved_bytes"] / 2 ** 20, 3),
                         "total incl. params+grads (MiB)": round(v["total_bytes"] / 2 ** 20, 3),
                         "paper's dense KKT matrix, float32 (MiB, computed)": (
                             round(v["kkt_dense_bytes"] / 2 ** 20, 1) if m == "implicit_etf" else "-")})
    return rows


def table_html(rows: list[dict[str, Any]]) -> str:
    """A list of row dicts as an HTML table (for display in the notebook without pandas)."""
    import html as _html

    if not rows:
        raise ValueError("rows must not be empty.")
    cols = list(rows[0])
    head = "".join(f"<th>{_html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# =========================================================================== the solver, for teaching
def figure_solver_convergence(conv: dict[str, Any]) -> go.Figure:
    """(a) distance to the closed form and objective gap per Riemannian iteration (log y), (b) singular values
    of Z with and without the proximal term."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Riemannian trust region vs closed form",
                                                        f"singular values of Z (delta = {conv['delta']:g})"])
    eps = 1e-17
    fig.add_trace(go.Scatter(x=conv["iterations"], y=[max(v, eps) for v in conv["dist"]], mode="lines+markers",
                             name="||U_k − polar(Z)||"), row=1, col=1)
    fig.add_trace(go.Scatter(x=conv["iterations"], y=[max(v, eps) for v in conv["gap"]], mode="lines+markers",
                             name="objective gap"), row=1, col=1)
    k = list(range(1, conv["C"] + 1))
    fig.add_trace(go.Bar(x=k, y=[max(v, eps) for v in conv["singular_values_delta0"]], name="delta = 0"), row=1, col=2)
    fig.add_trace(go.Bar(x=k, y=[max(v, eps) for v in conv["singular_values"]], name=f"delta = {conv['delta']:g}"),
                  row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="iteration", row=1, col=1)
    fig.update_xaxes(title_text="index i of s_i", row=1, col=2)
    fig.update_layout(height=400, width=1100, template="plotly_white", barmode="group")
    return fig
