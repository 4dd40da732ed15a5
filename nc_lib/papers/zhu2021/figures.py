"""Zhu et al. (2021)'s figures and table: the six panels of Figs. 3-6 against epoch, and Table 1 (memory).

Measurements (Zhu's definitions, :data:`nc_lib.metrics.PAPER_NAMES` ``["zhu2021"]``), at every epoch:

- NC1 = Tr(Sigma_W Sigma_B^+)/C                                    (``within_class_variability``)
- NC2 = || W W^T/||W W^T||_F - (I - 11^T/C)/sqrt(C-1) ||_F, W uncentred (``classifier_etf_distance``;
  on the centred class means ``means_etf_distance``, used in the fixed-classifier figures, where
  the classifier is an exact ETF by construction and its NC2 is 0 at every epoch)
- NC3 = || W Mdot/||W Mdot||_F - (I - 11^T/C)/sqrt(C-1) ||_F        (``classifier_means_alignment``)
- NC4 = || W mu_G + b ||_2                                         (``bias_offset_norm``)

:func:`table1` measures, for the four ``fig6`` variants, trainable parameters, the peak training
memory at the configured batch and the parameter + gradient + optimiser-state bytes
(:func:`measure_training_memory`), with the final test accuracy of the trained runs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ...config import TrainConfig
from ...metrics import PAPER_NAMES
from ...runs import RunResult
from .memory import measure_training_memory

#: the six panels of Zhu's Figures 3-6: record key -> panel title
PANELS: dict[str, str] = {
    PAPER_NAMES["zhu2021"]["NC1"]: "NC1: Tr(Σ_W Σ_B⁺)/C",
    PAPER_NAMES["zhu2021"]["NC2"]: "NC2: classifier W vs ETF",
    PAPER_NAMES["zhu2021"]["NC3"]: "NC3: W vs centred means",
    PAPER_NAMES["zhu2021"]["NC4"]: "NC4: ‖W μ_G + b‖",
    "train_accuracy": "training accuracy",
    "test_accuracy": "test accuracy",
}

#: fixed-classifier figures: NC2 on the centred class means (W is an exact ETF by construction)
PANELS_FIXED: dict[str, str] = {PAPER_NAMES["zhu2021"]["NC1"]: PANELS[PAPER_NAMES["zhu2021"]["NC1"]],
                PAPER_NAMES["zhu2021"]["NC2 (means)"]: "NC2: centred class means vs ETF",
                **{k: v for k, v in PANELS.items() if k not in (PAPER_NAMES["zhu2021"]["NC1"], PAPER_NAMES["zhu2021"]["NC2"])}}

#: what each experiment is drawn as
FIGURE_IDS = {"fig3": "zhu2021_fig3", "fig3_mnist": "zhu2021_fig3_mnist", "fig4": "zhu2021_fig4",
              "fig5": "zhu2021_fig5", "fig6": "zhu2021_fig6", "fig6_resnet50": "zhu2021_fig6_resnet50"}


def figure(results: Mapping[str, RunResult | Sequence[dict[str, Any]]], *, fixed: bool = False,
           title: str | None = None) -> Any:
    """Zhu's six panels (NC1, NC2, NC3, NC4, train accuracy, test accuracy) against epoch, a curve
    per label of ``results`` (RunResults or lists of records). ``fixed=True``: NC2 on the centred
    class means instead of on W (a fixed ETF classifier has NC2 = 0 by construction). NC1 on a log axis."""
    from ...plots import plot_metric_curves  # not at import: the memory subprocess imports this package

    if not results:
        raise ValueError("results must hold at least one label -> run.")
    panels = PANELS_FIXED if fixed else PANELS
    histories = {label: (r.history if isinstance(r, RunResult) else list(r)) for label, r in results.items()}
    return plot_metric_curves(histories, list(panels), x="epoch", log_y=[PAPER_NAMES["zhu2021"]["NC1"]],
                              titles=panels, cols=3, x_title="epoch", title=title, height=700)


def figure_fig3(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig3`` / ``zhu2021_fig3_mnist``: a curve per optimiser."""
    return figure(results, **kw)


def figure_fig4(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig4``: a curve per network (random labels)."""
    return figure(results, **kw)


def figure_fig5(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig5``: weight decay on the network versus on the features."""
    return figure(results, **kw)


def figure_fig6(results: Mapping[str, Any], **kw: Any) -> Any:
    """``zhu2021_fig6`` / ``zhu2021_fig6_resnet50``: learned / fixed W x d = wide / C; NC2 on the means."""
    return figure(results, fixed=True, **kw)


#: Zhu et al.: the fixed ETF classifier with d = C "achieves on-par test accuracy" (within about a point)
PAPER_ACCURACY_GAP = 0.01


def fixed_accuracy_gap(results: Mapping[str, RunResult]) -> float:
    """Final test accuracy of the fixed ETF classifier with d = C minus that of the learned classifier at
    the wide d (the first and last of :data:`~nc_lib.papers.zhu2021.grid.FIXED_VARIANTS`), in [-1, 1]."""
    from .grid import FIXED_VARIANTS

    missing = [v for v in (FIXED_VARIANTS[0], FIXED_VARIANTS[-1]) if v not in results]
    if missing:
        raise ValueError(f"results must hold the variants {missing}; have {sorted(results)}.")
    return (float(results[FIXED_VARIANTS[-1]].final["test_accuracy"])
            - float(results[FIXED_VARIANTS[0]].final["test_accuracy"]))


def fixed_gap_note(results: Mapping[str, RunResult]) -> str:
    """One sentence, measured from the finished runs: does the fixed ETF classifier with d = C end within
    one point of test accuracy of the learned classifier, as the paper claims, and by how much."""
    from .grid import FIXED_VARIANTS

    gap = fixed_accuracy_gap(results)
    learned = float(results[FIXED_VARIANTS[0]].final["test_accuracy"])
    fixed = float(results[FIXED_VARIANTS[-1]].final["test_accuracy"])
    verdict = ("within one point, as the paper claims" if abs(gap) <= PAPER_ACCURACY_GAP else
               f"{'above' if gap > 0 else 'below'} it by more than the paper's one point")
    return (f"Measured: final test accuracy {fixed:.2%} with the fixed ETF classifier at d = C against {learned:.2%} "
            f"with the learned classifier at the wide d ({100 * gap:+.2f} points): {verdict}.")


# ----------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------
PAPER_SAVING = 0.20  # "reduces memory cost by over 20% on ResNet18" (in fact the parameter count, -20.7%)



def table1(configs: Mapping[str, TrainConfig], results: Mapping[str, RunResult] | None = None, *,
           steps: int = 3, memory: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Table 1: per variant, trainable parameters, measured peak training memory (MiB), parameter +
    gradient + optimiser-state memory (MiB) and final test accuracy (from ``results``).

    ``memory`` may pass measurements already taken (label -> :func:`measure_training_memory` dict).
    Savings are relative to the first label (the learned classifier at the wide d).
    """
    if not configs:
        raise ValueError("configs must hold at least one variant.")
    mem = {label: dict(memory[label]) if memory and label in memory else measure_training_memory(cfg, steps)
           for label, cfg in configs.items()}
    ref = next(iter(configs))
    rows = []
    for label, cfg in configs.items():
        m = mem[label]
        row = {"variant": label, "classifier": "fixed ETF" if cfg.head.startswith("fixed") else "learned",
               "feature dim d": cfg.feature_dim if cfg.feature_dim is not None else "network's own",
               "trainable parameters": int(m["trainable_parameters"]),
               "peak training memory (MiB)": round(m["peak_bytes"] / 2 ** 20, 2),
               "params+grads+optimiser state (MiB)": round(m["param_grad_state_bytes"] / 2 ** 20, 2),
               "memory saving vs first": round(1 - m["peak_bytes"] / mem[ref]["peak_bytes"], 4),
               "parameter saving vs first": round(1 - m["trainable_parameters"] / mem[ref]["trainable_parameters"], 4),
               "batch": cfg.batch_size, "device": m["device"]}
        if results is not None and label in results:
            row["test accuracy"] = round(float(results[label].final.get("test_accuracy", float("nan"))), 4)
        rows.append(row)
    return rows


def compare_with_paper(rows: Sequence[Mapping[str, Any]]) -> str:
    """One sentence comparing the measured saving of the fixed d = C variant with the paper's "over 20%"."""
    if not rows:
        raise ValueError("rows must hold the rows of table1.")
    best = rows[-1]
    saving, psaving = float(best["memory saving vs first"]), float(best["parameter saving vs first"])
    verdict = "more than" if saving > PAPER_SAVING else "less than"
    return (f"Measured: '{best['variant']}' uses {saving:.1%} less peak training memory than '{rows[0]['variant']}' "
            f"({rows[0]['peak training memory (MiB)']} -> {best['peak training memory (MiB)']} MiB) and has "
            f"{psaving:.1%} fewer trainable parameters; that is {verdict} the paper's \"over 20%\", which the authors "
            f"derived from the parameter count of ResNet18 (11.17M -> 8.87M, -20.7%) without measuring memory.")
