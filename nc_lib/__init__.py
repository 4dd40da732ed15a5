"""nc_lib: neural collapse, measured and taught.

``nc_lib.measure_model`` and ``nc_lib.CollapseMonitor`` are the two entry points for a network the kit
did not build; they are imported on first use, so that ``import nc_lib`` stays light.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name -> the module that holds it (imported on first access)
_LAZY = {"measure_model": "any_model", "CollapseMeasurement": "any_model", "CollapseMonitor": "monitor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
