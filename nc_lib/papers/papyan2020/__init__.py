"""The reproduction of Papyan, Han & Donoho (2020): the experiment grid per scale, its runs, its figures and table.

Papyan, Han & Donoho (2020), "Prevalence of neural collapse during the terminal phase of deep learning
training" (PNAS, arXiv 2008.08186): the builders of ``papyan2020_fig2`` .. ``fig8`` and
``papyan2020_table1`` (REFERENCE.md sections 2, 3 and 5).

One module per part of the reproduction; their public names are exported here (``papyan2020.grid``,
``papyan2020.run_grid``, ``papyan2020.figure``, ...):

* ``grid`` -- the datasets, networks and protocol of every run at the ``quick``, ``medium`` and ``paper`` scales
  (:func:`grid`, :func:`scale_note`);
* ``runs`` -- training (or loading) the grid with DeepFool's robustness measured along the way
  (:func:`run_grid`, :func:`load_grid`, :func:`measure_robustness`), and the onset of the terminal
  phase (:func:`terminal_phase_onset`), and what the runs show of the paper's findings
  (:func:`terminal_phase_report`, :func:`fidelity_failures`);
* ``figures`` -- Papyan's figures (:func:`figure`, one per ``fig2`` .. ``fig8``), Table 1
  (:func:`table1`) and the collapse animation of a real run (:func:`collapse_animation`).
"""
from .grid import (DATASET_NAMES, DEFAULT_LR, FAMILIES, FAMILY_NAMES, PAPER_EPOCHS, PAPER_NETWORKS, PAPER_PER_CLASS,
                   QUICK_DATASETS, QUICK_EPOCHS, QUICK_NETWORKS, QUICK_WEIGHT_DECAY, SCALES, Key, family, grid,
                   network_label, scale_note)
from .runs import (ROBUSTNESS_FILE, ROBUSTNESS_IMAGES, load_grid, measure_robustness, read_robustness,
                   records_with_robustness, robustness_callback, robustness_epochs, robustness_images, run_grid,
                   terminal_phase_onset, tpt_threshold, TPT_FALLING, MIN_NC1_FALL, terminal_phase_report,
                   fidelity_failures)
from .figures import (FIGURES, animation_snapshots, collapse_animation, figure, figure_equiangularity,
                      figure_equinorm, figure_max_angle, figure_nc1, figure_ncc, figure_robustness,
                      figure_self_duality, table1)

__all__ = [
    "DATASET_NAMES", "DEFAULT_LR", "FAMILIES", "FAMILY_NAMES", "PAPER_EPOCHS", "PAPER_NETWORKS", "PAPER_PER_CLASS",
    "QUICK_DATASETS", "QUICK_EPOCHS", "QUICK_NETWORKS", "QUICK_WEIGHT_DECAY", "SCALES", "Key", "family", "grid",
    "network_label", "scale_note",
    "ROBUSTNESS_FILE", "ROBUSTNESS_IMAGES", "load_grid", "measure_robustness", "read_robustness",
    "records_with_robustness", "robustness_callback", "robustness_epochs", "robustness_images", "run_grid",
    "terminal_phase_onset", "tpt_threshold", "TPT_FALLING", "MIN_NC1_FALL", "terminal_phase_report",
    "fidelity_failures",
    "FIGURES", "animation_snapshots", "collapse_animation", "figure", "figure_equiangularity", "figure_equinorm",
    "figure_max_angle", "figure_nc1", "figure_ncc", "figure_robustness", "figure_self_duality", "table1",
]
