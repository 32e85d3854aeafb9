"""The one exception type leanconv raises for a user's mistake.

A :class:`LeanconvError` carries a single line that names the problem and what to do about
it. The CLI prints it as ``leanconv: error: <line>`` and exits with status 2, without a
traceback. Anything else that escapes is a bug in leanconv and keeps its traceback.
"""

__all__ = ["LeanconvError"]


class LeanconvError(Exception):
    """A user error: bad argument, missing or corrupt file, impossible budget, unsupported layer."""
