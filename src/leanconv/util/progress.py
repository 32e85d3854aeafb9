"""The callbacks through which long work reports itself (the library never prints).

* ``Progress``: ``progress(done, total, info)`` after each step of a loop (training steps,
  Hutchinson probes, 3-D samples); ``info`` holds a few figures to show (loss, accuracy).
  The CLI renders it as a progress bar on stderr.
* ``Stage``: ``stage(text)`` when a run moves to its next stage ("fine-tuning for 3
  epochs"); the CLI prints it on stderr.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["Progress", "Stage", "quiet"]

Progress = Callable[[int, int, dict], None]
Stage = Callable[[str], None]


def quiet(text: str) -> None:
    """A ``Stage`` that says nothing."""
