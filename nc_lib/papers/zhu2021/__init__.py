"""The reproduction of Zhu et al. (2021)'s deep-network experiments: grids per scale, runs, figures and Table 1.

Zhu et al. (2021), "A Geometric Analysis of Neural Collapse with Unconstrained Features": the deep-network
experiments (REFERENCE.md sections 2, 3 and 5), as options of the training engine.

One module per part of the reproduction; their public names are exported here (``zhu2021.grid``,
``zhu2021.run_optimisers``, ``zhu2021.figure_fig3``, ...):

* ``grid`` -- the four experiments (optimisers, validity of the UFM, weight decay on the features, the
  fixed ETF classifier) at the ``quick``, ``medium`` and ``paper`` scales (:func:`grid`, :func:`note`);
* ``runs`` -- training (or loading) an experiment (:func:`run_experiment`, :func:`run_optimisers`, ...);
* ``memory`` -- the measured memory of training a variant (:func:`measure_training_memory`);
* ``figures`` -- Zhu's six panels per experiment (:func:`figure`, :func:`figure_fig3` .. :func:`figure_fig6`)
  and Table 1 (:func:`table1`, :func:`compare_with_paper`).
"""
from .grid import EXPERIMENTS, FIXED_VARIANTS, SCALES, grid, medium_grid, note, paper_grid, quick_grid
from .runs import (run_experiment, run_feature_decay, run_fixed_classifier, run_grid, run_optimisers,
                   run_ufm_validity)
from .memory import measure_training_memory, measure_training_memory_inprocess, state_bytes, training_loss
from .figures import (FIGURE_IDS, PANELS, PANELS_FIXED, PAPER_ACCURACY_GAP, PAPER_SAVING, compare_with_paper, figure,
                      figure_fig3, figure_fig4, figure_fig5, figure_fig6, fixed_accuracy_gap, fixed_gap_note, table1)

__all__ = [
    "EXPERIMENTS", "FIXED_VARIANTS", "SCALES", "grid", "medium_grid", "note", "paper_grid", "quick_grid",
    "run_experiment", "run_feature_decay", "run_fixed_classifier", "run_grid", "run_optimisers", "run_ufm_validity",
    "measure_training_memory", "measure_training_memory_inprocess", "state_bytes", "training_loss",
    "FIGURE_IDS", "PANELS", "PANELS_FIXED", "PAPER_ACCURACY_GAP", "PAPER_SAVING", "compare_with_paper", "figure",
    "figure_fig3", "figure_fig4", "figure_fig5", "figure_fig6", "fixed_accuracy_gap", "fixed_gap_note", "table1",
]
