"""File sets that change all at once, and the rule for what an output may replace.

A run's files belong together (a model and its record; a training state, its model and its
metrics), so they must never be seen half from one run and half from another, even when the
process is killed between two writes. :func:`write_together` keeps each set of an output
folder in a version folder and switches one pointer::

    out/model.safetensors -> .leanconv/current/model.safetensors     (made once per name)
    out/record.json       -> .leanconv/current/record.json
    out/.leanconv/current -> sets/<id>                                 (the one pointer)
    out/.leanconv/sets/<id>/model.safetensors, record.json, ...        (the set in force)

A commit writes every file of the new set into a fresh version folder (files of the set in
force that it does not rewrite are carried over as hard links), makes the links for new
names (they point through the pointer, so they show the old state until the switch), then
replaces the pointer with one rename. A kill before that rename leaves the old set in
force; a kill after it, the new one; leftovers (unfinished version folders, the replaced
set) are cleaned up by the next commit in that folder. A file a program reads is just
``out/NAME`` (a symbolic link that the operating system follows).

What an output may replace (:func:`check_replaceable`): nothing, a regular file, or one of
these links. A device, a FIFO, a socket, a folder or a foreign symbolic link is refused in
one line: leanconv never renames over what it did not make.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from leanconv.errors import LeanconvError

__all__ = ["write_together", "check_replaceable", "check_set_folder", "is_set_link", "clean_up", "HIDDEN"]

log = logging.getLogger(__name__)

HIDDEN = ".leanconv"  # out/.leanconv/{current, sets/}
_CURRENT = "current"
_SETS = "sets"
_KINDS = [(stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO (named pipe)"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")]
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # a file system without symbolic links


def _link_target(name: str) -> str:
    return f"{HIDDEN}/{_CURRENT}/{name}"


def is_set_link(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a link :func:`write_together` made (``NAME -> .leanconv/current/NAME``)."""
    path = Path(path)
    return path.is_symlink() and os.readlink(path) == _link_target(path.name)


def check_replaceable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse an existing ``path`` that leanconv may not replace: anything but a regular file
    or a set link of its own (a device, FIFO, socket, folder or foreign symbolic link)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or is_set_link(path):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    raise LeanconvError(f"{what} {str(path)!r} is a {kind}, not a regular file; leanconv replaces only files it "
                        "can rename over safely: name another path")


def _current(folder: Path) -> Path | None:
    """The version folder in force, or None (also for a pointer leanconv did not make: it
    must read ``sets/<name>`` and lead to a real folder there)."""
    pointer = folder / HIDDEN / _CURRENT
    if not pointer.is_symlink():
        return None
    kind, _, name = os.readlink(pointer).partition("/")
    target = folder / HIDDEN / _SETS / name
    if kind != _SETS or name in ("", ".", "..") or "/" in name or target.is_symlink() or not target.is_dir():
        return None
    return target


def check_set_folder(folder: Path) -> None:
    """Refuse a ``.leanconv`` (or its ``sets``) that is not a real folder: a link there would
    make leanconv write, and clean up, somewhere it did not choose."""
    for path in (folder / HIDDEN, folder / HIDDEN / _SETS):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise LeanconvError(f"{str(path)!r} is not leanconv's own folder (a link or a file stands there); "
                                "remove it or write to another folder")


def clean_up(folder: str | os.PathLike) -> None:
    """Remove what a killed commit left in ``folder``: version folders not in force, a pointer
    that was never switched in, links to names the set in force lacks, and the staged files of
    older versions. Touches nothing the set in force shows. A folder copied by a tool that
    followed the links (its pointer is a folder, not a link) keeps what it shows as plain files
    and loses its version folders; the next commit starts a set from those files."""
    folder = Path(folder)
    check_set_folder(folder)
    for path in folder.glob(".staged.*"):  # the staging names of leanconv before file-set folders
        if path.is_file() and not path.is_symlink():
            path.unlink()
    hidden = folder / HIDDEN
    if not hidden.is_dir():
        return
    pointer = hidden / _CURRENT
    if pointer.exists() and not pointer.is_symlink():  # a copy of a folder that followed the links
        _materialise(folder)
        shutil.rmtree(hidden)
        return
    current = _current(folder)
    for path in hidden.glob(f"{_CURRENT}.*.tmp"):
        path.unlink()
    if (hidden / _SETS).is_dir():
        for path in (hidden / _SETS).iterdir():
            if current is None or path.name != current.name:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for path in folder.iterdir():
        if is_set_link(path) and not (current and (current / path.name).exists()):
            path.unlink()


def _materialise(folder: Path) -> None:
    """Turn every set link of ``folder`` into a regular file with its content (each file
    whole), so that the version folders behind them can go."""
    for path in folder.iterdir():
        if is_set_link(path) and path.is_file():
            tmp = folder / HIDDEN / f"{path.name}.plain.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, path)
        elif is_set_link(path):
            path.unlink()


def _new_version(folder: Path) -> Path:
    sets = folder / HIDDEN / _SETS
    sets.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix="", dir=sets))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(version, 0o777 & ~umask)  # mkdtemp makes 0700; readable as any folder the user makes
    return version


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _carry(source: Path, version: Path, names: Any) -> None:
    """Hard-link (or copy) the files of ``source`` not in ``names`` into ``version``."""
    for path in source.iterdir():
        if path.name not in names and path.is_file():
            _link_or_copy(path, version / path.name)


def _switch(folder: Path, version: Path) -> None:
    """Put ``version`` in force with one rename of the pointer."""
    hidden = folder / HIDDEN
    tmp = hidden / f"{_CURRENT}.{version.name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(f"{_SETS}/{version.name}", tmp)
    os.replace(tmp, hidden / _CURRENT)


def _link(folder: Path, name: str) -> None:
    """Make ``folder/name`` a set link (a no-op when it is one)."""
    path = folder / name
    if is_set_link(path):
        return
    tmp = folder / HIDDEN / f"{name}.link.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(_link_target(name), tmp)
    os.replace(tmp, path)


def _adopt(folder: Path, names: list[str]) -> None:
    """Move regular files named ``names`` (an older leanconv's outputs, or a file written
    alone) into the set in force without changing what the folder shows: the set gets the
    same file, then the link replaces it."""
    files = [n for n in names if (folder / n).is_file() and not (folder / n).is_symlink()]
    if not files:
        return
    current = _current(folder)
    version = _new_version(folder)
    if current is not None:
        _carry(current, version, set(files))
    for name in files:
        _link_or_copy(folder / name, version / name)
    _switch(folder, version)
    for name in files:
        _link(folder, name)
    if current is not None:
        shutil.rmtree(current)


def _replace_one_by_one(folder: Path, version: Path, names: list[str]) -> None:
    """Where the file system has no symbolic links: the files replace the old ones one by one
    (each file whole, the set not)."""
    log.warning("%s has no symbolic links; its files are replaced one by one, not as a set", folder)
    for name in names:
        os.replace(version / name, folder / name)
    shutil.rmtree(version)


def write_together(folder: str | os.PathLike, writers: dict[str, Callable[[Path], Any]]) -> None:
    """Write the files of one result as a set (module docstring): each ``writers[name](path)``
    writes the file at ``path``; the folder shows the previous set until all of them succeeded,
    then the new one. Files of the previous set not named in ``writers`` stay in the set."""
    folder = Path(folder)
    check_set_folder(folder)
    for name in writers:
        check_replaceable(folder / name)
    folder.mkdir(parents=True, exist_ok=True)
    clean_up(folder)
    try:
        _adopt(folder, list(writers))
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    current = _current(folder)
    version = _new_version(folder)
    try:
        if current is not None:
            _carry(current, version, set(writers))
        for name, write in writers.items():
            write(version / name)
        try:
            for name in writers:
                _link(folder, name)
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            _replace_one_by_one(folder, version, list(writers))
            return
        _switch(folder, version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    if current is not None:
        shutil.rmtree(current, ignore_errors=True)
