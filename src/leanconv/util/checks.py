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

__all__ = ["number", "bounds", "within", "fraction", "whole", "one_of", "brief"]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def number(value: Any, name: str, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None, at_most: float | None = None, why: str = "") -> float:
    """A finite real number within the given bounds."""
    must = bounds(above=above, at_least=at_least, below=below, at_most=at_most)
    if not within(value, above=above, at_least=at_least, below=below, at_most=at_most):
        raise LeanconvError(f"{name} must be a finite number{' ' + must if must else ''}{why}, got {brief(value)}")
    return value


def bounds(*, above: float | None = None, at_least: float | None = None, below: float | None = None,
           at_most: float | None = None) -> str:
    """The bounds in words: ``"above 0 and <= 1000"``."""
    words = [f"above {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
             f"below {below:g}" if below is not None else "", f"<= {at_most:g}" if at_most is not None else ""]
    return " and ".join(w for w in words if w)


def within(value: Any, *, above: float | None = None, at_least: float | None = None, below: float | None = None,
           at_most: float | None = None) -> bool:
    """Whether ``value`` is a finite real number within the bounds."""
    return _is_number(value) and (above is None or value > above) and (at_least is None or value >= at_least) \
        and (below is None or value < below) and (at_most is None or value <= at_most)


def fraction(value: Any, name: str, *, of: str = "") -> float:
    """A number strictly between 0 and 1 (a budget: the share of the original cost to keep)."""
    if not (_is_number(value) and 0 < value < 1):
        raise LeanconvError(f"{name} must lie strictly between 0 and 1{' (a fraction of the ' + of + ')' if of else ''}"
                            f", got {brief(value)}")
    return value


def whole(value: Any, name: str, *, at_least: int | None = None, at_most: int | None = None, why: str = "") -> int:
    """A whole number (not a bool, not 2.5), at least ``at_least`` and at most ``at_most``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LeanconvError(f"{name} must be a whole number, got {brief(value)}")
    if at_least is not None and value < at_least:
        raise LeanconvError(f"{name} must be at least {at_least}{why}, got {brief(value)}")
    if at_most is not None and value > at_most:
        span = f"between {at_least} and {at_most}" if at_least is not None else f"at most {at_most}"
        raise LeanconvError(f"{name} must be {span}{why}, got {brief(value)}")
    return int(value)


def brief(value: Any) -> str:
    """``repr(value)`` for a message, cut to 60 characters (a hostile value may be a megabyte
    long; a huge whole number is named by its size, as printing it may be refused)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**50:
        return f"a number of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def one_of(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise LeanconvError(f"{name} must be one of {', '.join(map(str, choices))}, got {brief(value)}")
    return value
