"""Argument checks shared by the solver constructors (torch.optim-style messages)."""

from __future__ import annotations

import math
import numbers


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return int(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number > 0)")
    return float(value)


def nonnegative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")
    return float(value)
