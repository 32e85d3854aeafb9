"""The one exception type leanconv raises for a user's mistake.

A :class:`LeanconvError` carries a single line that names the problem and what to do about
it. The CLI prints it as ``leanconv: error: <line>`` and exits with status 2, without a
traceback. Anything else that escapes is a bug in leanconv and keeps its traceback.
"""

__all__ = ["LeanconvError", "UnreachableLatency"]


class LeanconvError(Exception):
    """A user error: bad argument, missing or corrupt file, impossible budget, unsupported layer."""


class UnreachableLatency(LeanconvError):
    """A latency target below the fastest model the floors (or the search box) allow, as the
    latency table predicts it on this machine: a caller that chose the target itself (the
    demo) may try a milder one."""
