"""One validator library: the type predicates and the range/choice checks every config reader in ddpm_hf uses.

The schedulers, ``models/config_checks.py`` and the training arguments check their values with these functions,
so that "an int", "a real number" and "a bool" mean the same everywhere: a ``bool`` (or ``numpy.bool_``) is never a
count or a number, and a ``numpy`` integer or float is as good as a Python one. Each ``check_*`` raises
``TypeError`` for a value of the wrong type and ``ValueError`` for a value of the right type out of range, and
names the offending key or flag in the message.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_real",
    "interval_text",
    "is_bool",
    "is_finite_real",
    "is_int",
    "is_real",
]


def is_bool(value: Any) -> bool:
    """True for ``True``/``False`` and ``numpy.bool_``."""
    return isinstance(value, (bool, np.bool_))


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, False for bools (a flag is never a count)."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_real(value: Any) -> bool:
    """True for Python and numpy ints and floats (inf and NaN included), False for bools."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_finite_real(value: Any) -> bool:
    """``is_real`` and finite."""
    return is_real(value) and math.isfinite(value)


def interval_text(low: float, high: float, low_open: bool = True, high_open: bool = False) -> str:
    """The interval in the usual notation, e.g. ``(0.0, 1.0]``."""
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ValueError unless ``value`` is one of the strings ``allowed``.

    Args:
        name: the key or flag, as the user wrote it.
        value: the value given.
        allowed: the accepted strings.
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise TypeError unless ``value`` is a bool.

    Args:
        name: the key or flag.
        value: the value given.
    """
    if not is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise TypeError for a non-int and ValueError for an int below ``minimum``.

    Args:
        name: the key or flag.
        value: the value given.
        minimum: the smallest accepted value.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_real(name: str, value: Any, low: float, high: float, low_open: bool = True, high_open: bool = False) -> None:
    """Raise TypeError for a non-number and ValueError unless ``value`` is finite and inside the interval.

    Args:
        name: the key or flag.
        value: the value given.
        low, high: the interval's ends (``math.inf`` for none).
        low_open, high_open: whether each end is excluded.
    """
    interval = interval_text(low, high, low_open, high_open)
    if not is_real(value):
        raise TypeError(f"{name} must be a float in {interval}, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name} must be a finite float in {interval}, got {value!r}")
