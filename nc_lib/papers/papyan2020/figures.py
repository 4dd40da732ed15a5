"""Papyan, Han & Donoho (2020)'s figures and table, built from finished runs, and the collapse animation of a real run.

The builders of ``papyan2020_fig2`` .. ``fig8`` and ``papyan2020_table1``.

Papyan's layout: a column per dataset, a row per measurement, a curve per network family against the
epoch, and the onset of the terminal phase of each network marked; :data:`FIGURES` says what each
figure of the paper plots.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import plotly.graph_objects as go

from ...plots import collapse_animation as _collapse_animation
from ...plots import colour, plot_metric_curves
from ...runs import RunResult
from .grid import DATASET_NAMES, FAMILIES, FAMILY_NAMES, Key, family, network_label
from .runs import records_with_robustness, terminal_phase_onset

#: figure id -> (record keys, row titles, log y, panel title suffix)
FIGURES: dict[str, dict[str, Any]] = {
    "fig2": {"keys": ("equinorm_means", "equinorm_classifiers"), "log_y": False,
             "rows": ("Std/Avg of ||μ_c − μ_G||", "Std/Avg of ||w_c||")},
    "fig3": {"keys": ("equiangularity_means", "equiangularity_classifiers"), "log_y": False,
             "rows": ("Std of cos(μ_c − μ_G, μ_c' − μ_G)", "Std of cos(w_c, w_c')")},
    "fig4": {"keys": ("max_angle_means", "max_angle_classifiers"), "log_y": False,
             "rows": ("Avg |cos(μ_c − μ_G, μ_c' − μ_G) + 1/(C−1)|", "Avg |cos(w_c, w_c') + 1/(C−1)|")},
    "fig5": {"keys": ("self_duality",), "log_y": False, "rows": ("||W^T/||W|| − Ṁ/||Ṁ||||²",)},
    "fig6": {"keys": ("within_class_variability",), "log_y": True, "rows": ("Tr(Σ_W Σ_B⁺)/C",)},
    "fig7": {"keys": ("ncc_mismatch_test",), "log_y": False, "rows": ("NCC mismatch (test)",)},
    "fig8": {"keys": ("robustness",), "log_y": False, "rows": ("DeepFool ||r(x)||/||x|| (test)",)},
}


def figure(results: Mapping[Key, RunResult], key_or_keys: str | Sequence[str], *, log_y: bool | None = None,
           log_x: bool = False, title: str | None = None, row_titles: Sequence[str] | None = None,
           mark_tpt: bool = True) -> go.Figure:
    """Papyan's layout: a column per dataset, a row per measurement, a curve per network family,
    x = epoch, and the onset of the terminal phase of each network as a dashed line in its colour.

    key_or_keys: a figure of the paper ("fig2" .. "fig8", see :data:`FIGURES`) or record keys.
    """
    if not results:
        raise ValueError("results must hold at least one (dataset, network) -> RunResult.")
    if isinstance(key_or_keys, str) and key_or_keys in FIGURES:
        spec = FIGURES[key_or_keys]
        keys = list(spec["keys"])
        log_y = spec["log_y"] if log_y is None else log_y
        row_titles = list(row_titles or spec["rows"])
    else:
        keys = [key_or_keys] if isinstance(key_or_keys, str) else list(key_or_keys)
        if not keys:
            raise ValueError(f"key_or_keys must be one of {sorted(FIGURES)} or record keys.")
        row_titles = list(row_titles or keys)
        log_y = bool(log_y)
    datasets: list[str] = []
    for ds, _ in results:
        if ds not in datasets:
            datasets.append(ds)
    fams: list[str] = []
    for _, net in results:
        if family(net) not in fams:
            fams.append(family(net))
    fams = [f for f in FAMILIES if f in fams]
    colours = {FAMILY_NAMES[f]: colour(i) for i, f in enumerate(fams)}
    # one pseudo-key per (measurement, dataset): plot_metric_curves draws a subplot per key
    histories: dict[str, list[dict[str, Any]]] = {FAMILY_NAMES[f]: [] for f in fams}
    onsets: dict[tuple[str, str], int | None] = {}
    nets_per_ds: dict[str, list[str]] = {ds: [] for ds in datasets}
    with_rob = "robustness" in keys
    for (ds, net), res in sorted(results.items(), key=lambda kv: FAMILIES.index(family(kv[0][1]))):
        label = FAMILY_NAMES[family(net)]
        nets_per_ds[ds].append(network_label(net))
        onsets[(ds, label)] = terminal_phase_onset(res.history, ds)
        for r in records_with_robustness(res, with_rob):
            histories[label].append({"epoch": r["epoch"], **{f"{k}|{ds}": r[k] for k in keys if k in r}})
    pkeys = [f"{k}|{ds}" for k in keys for ds in datasets]
    titles = {f"{k}|{ds}": (f"{DATASET_NAMES.get(ds, ds)}<br><sup>{', '.join(nets_per_ds[ds])}</sup>" if i == 0 else "")
              for i, k in enumerate(keys) for ds in datasets}
    n = len(datasets)
    fig = plot_metric_curves(histories, pkeys, x="epoch", log_y=log_y, titles=titles, cols=n, x_title="epoch",
                             colours=colours, band=False, width=min(1500, 330 * n + 160),
                             height=270 * len(keys) + 170)
    # the legend goes under the panels, clear of the figure title and the two-line panel titles
    fig.update_layout(legend=dict(orientation="h", x=0, y=-0.12 - 0.2 / len(keys), yanchor="top"),
                      margin=dict(t=120, b=110))
    for i, rt in enumerate(row_titles):
        fig.update_yaxes(title_text=rt, row=i + 1, col=1, title_font=dict(size=11))
    if log_x:
        fig.update_xaxes(type="log")
    if mark_tpt:
        for i in range(len(keys)):
            for j, ds in enumerate(datasets):
                for label, col in colours.items():
                    e = onsets.get((ds, label))
                    if e is not None:
                        fig.add_vline(x=e, line=dict(color=col, dash="dash", width=1.3), row=i + 1, col=j + 1)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="TPT onset (first zero train error)",
                                 line=dict(color="grey", dash="dash")))
    if title:
        fig.update_layout(title=title)
    return fig


def figure_equinorm(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig2."""
    return figure(results, "fig2", **kw)


def figure_equiangularity(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig3."""
    return figure(results, "fig3", **kw)


def figure_max_angle(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig4."""
    return figure(results, "fig4", **kw)


def figure_self_duality(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig5."""
    return figure(results, "fig5", **kw)


def figure_nc1(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig6 (log y)."""
    return figure(results, "fig6", **kw)


def figure_ncc(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig7."""
    return figure(results, "fig7", **kw)


def figure_robustness(results: Mapping[Key, RunResult], **kw: Any) -> go.Figure:
    """papyan2020_fig8: DeepFool robustness against epoch."""
    return figure(results, "fig8", **kw)


# ----------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------
def table1(results: Mapping[Key, RunResult]) -> list[dict[str, Any]]:
    """Papyan's Table 1: per (dataset, network), the test accuracy at the first epoch of zero training
    error (the TPT onset; None if never reached) and at the last epoch."""
    rows = []
    for (ds, net), res in results.items():
        onset = terminal_phase_onset(res.history, ds)
        at = next((r for r in res.history if int(r["epoch"]) == onset), None) if onset is not None else None
        last = res.history[-1] if res.history else {}
        rows.append({"dataset": DATASET_NAMES.get(ds, ds), "network": network_label(net),
                     "tpt_onset_epoch": onset,
                     "test_accuracy_at_zero_train_error": None if at is None else at.get("test_accuracy"),
                     "last_epoch": last.get("epoch"),
                     "test_accuracy_at_last_epoch": last.get("test_accuracy")})
    return rows


# ----------------------------------------------------------------------------------------------
# The collapse animation on a real run
# ----------------------------------------------------------------------------------------------
def animation_snapshots(result: RunResult) -> list[dict[str, Any]]:
    """The run's snapshots in the form :func:`nc_lib.plots.collapse_animation` reads (``step`` = epoch,
    ``feature_labels`` = the sample's labels)."""
    snaps = result.snapshots()
    if not snaps:
        raise ValueError(f"run {result.path} has no snapshots; train with snapshot_per_class > 0.")
    return [{**s, "step": int(s["epoch"]), "feature_labels": s["labels"]} for s in snaps]


def collapse_animation(result: RunResult, **kw: Any) -> go.Figure:
    """The collapse animation (class means, classifier rows, a feature sample at each measurement
    epoch) of one real run; the slider counts epochs."""
    cfg = result.config
    kw.setdefault("title", f"Neural collapse while training {network_label(cfg.model)} on "
                           f"{DATASET_NAMES.get(cfg.dataset, cfg.dataset)}")
    fig = _collapse_animation(animation_snapshots(result), **kw)
    if fig.layout.sliders:
        fig.layout.sliders[0].currentvalue.prefix = "epoch "
    return fig
