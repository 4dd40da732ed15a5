"""Clear errors for bad input: every message names the parameter and what would be valid."""
from __future__ import annotations

from typing import Any, Iterable


#: The kit's scales, one papermill parameter with the same code path: ``quick`` (minutes on 2 CPU cores, CI),
#: ``medium`` (the papers' protocols on real data, about an hour on a laptop, minutes on a GPU), ``paper``
#: (the papers' settings; GPUs and downloaded data).
SCALES = ("quick", "medium", "paper")


def check_scale(scale: Any, name: str = "scale") -> str:
    """Return ``scale`` if it is one of :data:`SCALES`, else a ValueError listing the three scales."""
    return check_choice(name, scale, SCALES)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming both."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}.")
    return value


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an int within [minimum, maximum], else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (hasattr(value, "__index__")):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}.")
    return value


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None


def check_nonnegative(name: str, value: Any) -> float:
    """Return ``value`` as a float >= 0, else raise a ValueError naming it."""
    value = _as_float(name, value)
    if not value >= 0:  # also catches NaN
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float > 0, else raise a ValueError naming it."""
    value = _as_float(name, value)
    if not value > 0:  # also catches NaN
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value


FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def check_float_dtype(name: str, value: Any) -> Any:
    """Return ``value`` as a floating-point ``torch.dtype``: a torch dtype or its name ("float32" or
    "torch.float32"), else raise a ValueError naming the parameter and the valid choices."""
    import torch

    if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPE_NAMES:
        return getattr(torch, value.removeprefix("torch."))
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise ValueError(f"{name}={value!r} is not a floating-point dtype; choose one of "
                     f"{[f'torch.{n}' for n in FLOAT_DTYPE_NAMES]} or their names {list(FLOAT_DTYPE_NAMES)}.")
