"""Zhu et al. (2021)'s runs: train (or load) each experiment of the grid through the training engine."""
from __future__ import annotations

from typing import Any, Mapping

from ...config import TrainConfig
from ...runs import RunResult
from ...train import train
from ...validation import check_choice
from .grid import EXPERIMENTS, grid

def run_grid(configs: Mapping[str, TrainConfig], *, progress: bool = False) -> dict[str, RunResult]:
    """Train every configuration (a finished run is loaded, not retrained)."""
    return {label: train(cfg, progress=progress) for label, cfg in configs.items()}


def run_experiment(experiment: str, scale: str = "quick", *, progress: bool = False) -> dict[str, RunResult]:
    """Train (or load) one experiment of :func:`grid`."""
    check_choice("experiment", experiment, EXPERIMENTS)
    return run_grid(grid(scale)[experiment], progress=progress)


def run_optimisers(scale: str = "quick", mnist: bool = False, **kw: Any) -> dict[str, RunResult]:
    """Experiment 1: SGD / Adam / LBFGS (``mnist=True``: the appendix version)."""
    return run_experiment("fig3_mnist" if mnist else "fig3", scale, **kw)


def run_ufm_validity(scale: str = "quick", **kw: Any) -> dict[str, RunResult]:
    """Experiment 2: random labels, MLP widths/depths and ResNet18 widths."""
    return run_experiment("fig4", scale, **kw)


def run_feature_decay(scale: str = "quick", **kw: Any) -> dict[str, RunResult]:
    """Experiment 3: weight decay on the network versus on the raw features."""
    return run_experiment("fig5", scale, **kw)


def run_fixed_classifier(scale: str = "quick", resnet50: bool = False, **kw: Any) -> dict[str, RunResult]:
    """Experiment 4: learned / fixed W x d = wide / C (``resnet50=True``: the appendix version)."""
    return run_experiment("fig6_resnet50" if resnet50 else "fig6", scale, **kw)
