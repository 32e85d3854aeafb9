"""Files written whole or not at all, file sets written together, and the JSON-lines store.

Every file leanconv writes goes through :func:`atomic_write`: the content is written under a
temporary name in the target folder and renamed over the target only when complete, so a
crash (or a full disk) never leaves a partial file where a good one was; a target that is not
a regular file (a device, a FIFO) is refused, never replaced. Files that belong together (a
model and its record) are written as a set by :func:`leanconv.util.fileset.write_together`.
Append-only logs (samples, comparison entries, explored variants, training metrics) are
:class:`JsonlStore` files: one JSON object per line, each line flushed and fsynced, a line
cut short by a crash skipped on reading and closed before the next append.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from leanconv.errors import LeanconvError
from leanconv.util.fileset import check_replaceable

__all__ = ["atomic_write", "write_text", "write_json", "file_sha256", "JsonlStore", "os_error", "is_os_failure",
           "json_error"]

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary name in the target folder, then rename over ``path``:
    a crash never leaves a partial file where a good one was."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def os_error(exc: BaseException, path: str | os.PathLike) -> OSError:
    """The :class:`OSError` behind a writer's own error type (safetensors, exporters), found in
    its chain of causes or as ``(os error N)`` in its message; ``EIO`` with the message otherwise."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"os error (\d+)", str(exc))
    number = int(found.group(1)) if found else errno.EIO
    return OSError(number, os.strerror(number) if found else str(exc).splitlines()[0], str(path))


def is_os_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error behind it) is the file system refusing a write."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) or re.search(r"os error \d+", str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def json_error(exc: ValueError | RecursionError) -> str:
    """What is wrong with a JSON text, for a message: where it fails, or that it nests too deep
    (deeper than Python's recursion limit, which ``json`` reports as a ``RecursionError``)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return "nested too deep"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class JsonlStore:
    """An append-only file of JSON objects, one per line.

    Appends are flushed and fsynced. A last line cut short by a crash (no newline after it,
    not valid JSON) is skipped with a warning when reading, and closed with a newline before
    the next append. Any other line that is not a JSON object is skipped with a warning, or,
    with ``strict``, raises :class:`LeanconvError` naming the file and line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def numbered(self, *, strict: bool = False) -> list[tuple[int, dict]]:
        """``(line number, record)`` for every record, in file order (1-based line numbers)."""
        if not self.path.exists():
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LeanconvError(f"cannot read {self.path}: {exc}") from None
        lines = text.split("\n")
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            torn = number == len(lines)  # the text after the last newline: an interrupted append
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                if strict and not torn:
                    raise LeanconvError(f"{self.path} line {number}: not valid JSON ({json_error(exc)})") from None
                log.warning("%s line %d is not JSON (an interrupted write?); ignored", self.path, number)
                continue
            if not isinstance(record, dict):
                if strict:
                    raise LeanconvError(f"{self.path} line {number}: a record must be a JSON object, "
                                        f"got {type(record).__name__}")
                log.warning("%s line %d is not a JSON object; ignored", self.path, number)
                continue
            out.append((number, record))
        return out

    def read(self, *, strict: bool = False) -> list[dict]:
        """Every record, in file order."""
        return [record for _, record in self.numbered(strict=strict)]

    def append(self, records: Iterable[dict]) -> int:
        """Append ``records`` (one line each); returns how many were written."""
        lines = [json.dumps(r, sort_keys=True, allow_nan=False) for r in records]
        if not lines:
            return 0
        check_replaceable(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")  # close a line torn by a crash
            fh.write(("\n".join(lines) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        return len(lines)
