"""Argument checks shared by every constructor: one ValueError, raised at construction, that names
the parameter and the values it allows.

Booleans are refused where numbers are expected (``True`` is an ``int`` to Python, never a
density or a world size to us), and NaN fails every interval check.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Literal, TypeVar, overload

_T = TypeVar("_T")

__all__ = ["check_choice", "check_density", "check_int", "check_size", "check_unit_interval"]


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """An integer ``>= low`` (and ``<= high`` when given), as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return value


def check_size(name: str, value: object, low: int = 1) -> int:
    """A count of things (workers, rows, columns): an integer ``>= low``."""
    return check_int(name, value, low)


@overload
def check_unit_interval(
    name: str, value: object, meaning: str | None = None, *, allow_none: Literal[False] = False
) -> float: ...


@overload
def check_unit_interval(
    name: str, value: object, meaning: str | None = None, *, allow_none: bool
) -> float | None: ...


def check_unit_interval(
    name: str, value: object, meaning: str | None = None, *, allow_none: bool = False
) -> float | None:
    """A float in (0, 1] (``meaning``, when given, says what it is), or ``None`` when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 < float(value) <= 1.0):
        allowed = (
            "a float in (0, 1]" + (f" ({meaning})" if meaning else "") + (" or None" if allow_none else "")
        )
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_density(density: object, name: str = "density") -> float:
    """A density: the fraction of entries a compressor keeps, in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise ValueError(f"{name} must be a float in (0, 1] (the fraction of entries kept), got {density!r}")
    density = float(density)
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries kept), got {density!r}")
    return density


def check_choice(name: str, value: _T, choices: Collection[_T]) -> _T:
    """One of ``choices`` (listed in the message in their own order)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
