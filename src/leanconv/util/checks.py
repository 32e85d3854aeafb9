"""Argument checks that raise one clear line (:class:`~leanconv.errors.LeanconvError`).

Each check returns the value it was given, so that a config field or a library function can
check and use in one step. ``name`` is what the message calls the value: the command-line
option (``--probes``) where there is one, else the Python argument's name.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from leanconv.errors import LeanconvError

__all__ = ["number", "fraction", "whole", "one_of"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def number(value: Any, name: str, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None, at_most: float | None = None, why: str = "") -> float:
    """A finite real number within the given bounds."""
    bounds = [f"above {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
              f"below {below:g}" if below is not None else "", f"<= {at_most:g}" if at_most is not None else ""]
    must = " and ".join(b for b in bounds if b)
    ok = _is_number(value) and (above is None or value > above) and (at_least is None or value >= at_least) \
        and (below is None or value < below) and (at_most is None or value <= at_most)
    if not ok:
        raise LeanconvError(f"{name} must be a finite number{' ' + must if must else ''}{why}, got {value!r}")
    return value


def fraction(value: Any, name: str, *, of: str = "") -> float:
    """A number strictly between 0 and 1 (a budget: the share of the original cost to keep)."""
    if not (_is_number(value) and 0 < value < 1):
        raise LeanconvError(f"{name} must lie strictly between 0 and 1{' (a fraction of the ' + of + ')' if of else ''}"
                            f", got {value!r}")
    return value


def whole(value: Any, name: str, *, at_least: int | None = None, why: str = "") -> int:
    """A whole number (not a bool, not 2.5), at least ``at_least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LeanconvError(f"{name} must be a whole number, got {value!r}")
    if at_least is not None and value < at_least:
        raise LeanconvError(f"{name} must be at least {at_least}{why}, got {value}")
    return int(value)


def one_of(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise LeanconvError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value
