"""Where the kit reads and writes: datasets, training runs, figures.

Each location can be moved with an environment variable, which is how the tests keep the
working tree clean: ``NC_DATA_DIR``, ``NC_RUNS_DIR``, ``NC_FIGURES_DIR``.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _dir(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or (REPO_ROOT / default))
    return path


def data_dir() -> Path:
    """The dataset cache (``data/`` by default, ``$NC_DATA_DIR`` if set)."""
    return _dir("NC_DATA_DIR", "data")


def runs_dir() -> Path:
    """The run store for trained models and their metrics (``runs/`` or ``$NC_RUNS_DIR``)."""
    return _dir("NC_RUNS_DIR", "runs")


def figures_dir() -> Path:
    """Where figures, tables and the manifest land (``figures/`` or ``$NC_FIGURES_DIR``)."""
    return _dir("NC_FIGURES_DIR", "figures")


#: the environment variables that move the kit's folders
ENV_DIRS = ("NC_DATA_DIR", "NC_RUNS_DIR", "NC_FIGURES_DIR")


def pin_env_dirs() -> dict[str, str]:
    """Make every relative ``NC_*_DIR`` absolute, against the current directory, and return the ones changed.

    ``NC_RUNS_DIR=runs make figures`` means the ``runs/`` of the directory the command was typed in; a notebook
    kernel runs in ``notebooks/`` and would otherwise read and write ``notebooks/runs`` (and train again)."""
    changed = {}
    for name in ENV_DIRS:
        value = os.environ.get(name)
        if value and not os.path.isabs(value):
            os.environ[name] = changed[name] = os.path.abspath(value)
    return changed
