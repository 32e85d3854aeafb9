"""Input paths checked before they are opened: one line that says what a path is when it is
not what a command reads.

``Path.is_file()`` is False for a missing file, a FIFO, a device, a symlink loop and a
dangling symlink alike, and opening a FIFO blocks forever. :func:`input_file` and
:func:`input_folder` tell these apart (``lstat``/``stat`` and their errors) and raise a
:class:`~leanconv.errors.LeanconvError` naming what was found: "does not exist", "is a
symbolic link loop", "is a named pipe (FIFO), not a regular file", and so on.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from leanconv.errors import LeanconvError

__all__ = ["input_file", "input_folder", "path_kind"]

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file"))


def path_kind(path: str | os.PathLike) -> str:
    """What ``path`` is, in words: "a regular file", "a folder", "a named pipe (FIFO)", ...,
    "a symbolic link loop", "a symbolic link to a missing target", "missing", or "unreadable
    (REASON)"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a symbolic link to a missing target" if os.path.islink(path) else "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if exc.errno == errno.ENOTDIR:
            return "missing"  # a file where a folder of the path should be
        return f"unreadable ({exc.strerror or exc})"
    except ValueError:  # an embedded NUL byte
        return "not a valid path"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str | os.PathLike, what: str, kind: str, wanted: str) -> LeanconvError:
    if kind == "missing":
        return LeanconvError(f"{what} {str(path)!r} does not exist")
    return LeanconvError(f"{what} {str(path)!r} is {kind}, not {wanted}; name {wanted}")


def input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is (a link to) a regular file; else one line saying what it is."""
    kind = path_kind(path)
    if kind == "a folder":
        raise LeanconvError(f"{what} {str(path)!r} is a folder; name the file inside it")
    if kind != "a regular file":
        raise _refuse(path, what, kind, "a regular file")
    return Path(path)


def input_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """``path`` as a Path when it is (a link to) a folder; else one line saying what it is."""
    kind = path_kind(path)
    if kind != "a folder":
        raise _refuse(path, what, kind, "a folder")
    return Path(path)
