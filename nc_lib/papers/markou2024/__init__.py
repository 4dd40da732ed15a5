"""The reproduction of Markou, Ajanthan & Gould (2024), "Guiding Neural Collapse": grids, runs, costs, figures.

Three classifier heads are compared (REFERENCE.md sections 3-4):

* ``standard``  -- a learned linear classifier on tau-normalised features whose rows are renormalised
  after every step (the authors' cosine classifier, :class:`nc_lib.heads.CosineHead`);
  ``standard_nonorm`` -- the same without any normalisation (:class:`nc_lib.heads.LinearHead`), the
  appendix ablation;
* ``fixed_etf`` -- the canonical simplex ETF in the first C coordinates, frozen, bias b = -W mean(batch);
* ``implicit_etf`` -- W = (U* sqrt(C/(C-1))(I - 11^T/C))^T with U* the nearest simplex ETF to the
  running normalised class means (:class:`nc_lib.heads.ImplicitETFHead`);
  ``implicit_etf_nograd`` -- the same with the node's gradient stopped (the paper's ablation).

One module per part of the reproduction; their public names are exported here (``mk.ufm_grid``,
``mk.run_ufm``, ``mk.figure_panels``, ...):

* ``grid`` -- the scales, the methods and their heads, the UFM settings (:func:`ufm_grid`) and the
  real-data settings (:func:`real_grid`, :func:`grid`, :func:`real_note`) per scale, and each run's configuration;
* ``runs`` -- training (or loading) the runs: :func:`run_ufm`, :func:`run_ufm_grid`, :func:`run_real`;
* ``cost`` -- what the heads cost: time (:func:`measure_cost`) and memory (:func:`measure_memory`) per
  step, and the Riemannian solver against the closed form (:func:`solver_convergence`);
* ``figures`` -- the figure and table builders (Figs. 1-5, Tables 1-3);
* ``__main__`` -- ``python -m nc_lib.papers.markou2024 ufm --scale paper --device cuda [--only ufm1000]
  [--methods implicit_etf] [--json out.json]`` trains the UFM grid from the command line.
"""
from .grid import (ENGINE_HEADS, LABELS, MAIN_METHODS, METHODS, NOTEBOOK, OPTIMIZERS, PAPER, PAPER_UFM, QUICK_TEST_PER_CLASS,
                   SCALES, TAU,
                   UFMSetting, grid, make_head, real_grid, real_note, train_config, ufm_config, ufm_grid)
from .runs import RECORD_KEYS, run_real, run_ufm, run_ufm_grid, ufm_summary
from .cost import measure_cost, measure_memory, solver_convergence
from .figures import (LOG_PANELS, PANELS, accuracy_note, accuracy_table, figure_accuracy_vs_classes, figure_cost,
                      figure_cost_settings, figure_panels, figure_schematic, figure_solver_convergence,
                      first_full_accuracy, memory_table, table_html)

__all__ = [
    "ENGINE_HEADS", "LABELS", "MAIN_METHODS", "METHODS", "NOTEBOOK", "OPTIMIZERS", "PAPER", "PAPER_UFM", "QUICK_TEST_PER_CLASS",
    "SCALES", "TAU",
    "UFMSetting", "grid", "make_head", "real_grid", "real_note", "train_config", "ufm_config", "ufm_grid",
    "RECORD_KEYS", "run_real", "run_ufm", "run_ufm_grid", "ufm_summary",
    "measure_cost", "measure_memory", "solver_convergence",
    "LOG_PANELS", "PANELS", "accuracy_note", "accuracy_table", "figure_accuracy_vs_classes", "figure_cost",
    "figure_cost_settings", "figure_panels", "figure_schematic", "figure_solver_convergence", "first_full_accuracy",
    "memory_table", "table_html",
]
