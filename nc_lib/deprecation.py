"""Old import paths kept for one release: a module ``__getattr__`` that finds a moved name in its new home and warns."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Mapping


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module`` (its ``__name__``): ``moved`` maps each name that left it
    to the module that holds it now. Reading such a name returns the object from its new home with a
    DeprecationWarning naming that home; any other missing name raises AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        if name in moved:
            home = moved[name]
            warnings.warn(f"{module}.{name} has moved to {home}.{name}; import it from there "
                          "(the old path goes away in the next release).", DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(home), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
