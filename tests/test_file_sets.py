"""Outputs: a file set changes all at once, nothing but a regular file is ever replaced, and a
full disk is one line with exit status 1."""

from __future__ import annotations

import os
import shutil
import resource
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from leanconv.errors import LeanconvError
from leanconv.util import fileset
from leanconv.util.files import JsonlStore, atomic_write, write_text
from leanconv.util.fileset import check_replaceable, clean_up, write_together


def _visible(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if p.name != fileset.HIDDEN}


def _writer(text):
    return lambda p: p.write_text(text)


# --- file sets ----------------------------------------------------------------------------


def test_a_set_replaces_the_previous_one_and_keeps_what_it_does_not_rewrite(tmp_path):
    write_together(tmp_path, {"a.txt": _writer("a1"), "b.txt": _writer("b1")})
    write_together(tmp_path, {"a.txt": _writer("a2"), "c.txt": _writer("c2")})
    assert _visible(tmp_path) == {"a.txt": "a2", "b.txt": "b1", "c.txt": "c2"}
    assert len(list((tmp_path / ".leanconv" / "sets").iterdir())) == 1  # the replaced set is gone


@pytest.mark.parametrize("step", ["write", "link", "switch"])
def test_a_commit_that_stops_at_any_step_leaves_the_old_set(tmp_path, monkeypatch, step):
    """The writer fails, or the process stops before a new name is linked or the pointer moves."""
    write_together(tmp_path, {"a.txt": _writer("old a"), "b.txt": _writer("old b")})

    def stop(*args, **kwargs):
        raise OSError("stopped here")

    writers = {"a.txt": _writer("new a"), "b.txt": _writer("new b"), "new.txt": _writer("new")}
    if step == "write":
        writers["b.txt"] = lambda p: (p.write_text("partial"), stop())
    else:
        monkeypatch.setattr(fileset, "_link" if step == "link" else "_switch", stop)
    with pytest.raises(OSError, match="stopped here"):
        write_together(tmp_path, writers)
    monkeypatch.undo()
    assert {k: v for k, v in _visible_or_dangling(tmp_path).items() if v is not None} == \
        {"a.txt": "old a", "b.txt": "old b"}
    write_together(tmp_path, {"a.txt": _writer("a3")})  # the next commit cleans up what was left
    assert _visible(tmp_path) == {"a.txt": "a3", "b.txt": "old b"}
    assert len(list((tmp_path / ".leanconv" / "sets").iterdir())) == 1


def _visible_or_dangling(folder: Path) -> dict[str, str | None]:
    """Every visible name; a link that points at nothing yet reads as None (no file)."""
    return {p.name: (p.read_text() if p.exists() else None) for p in folder.iterdir() if p.name != fileset.HIDDEN}


def test_clean_up_removes_what_a_killed_commit_left(tmp_path):
    write_together(tmp_path, {"a.txt": _writer("a")})
    sets = tmp_path / ".leanconv" / "sets"
    (sets / "unfinished").mkdir()
    (sets / "unfinished" / "a.txt").write_text("half")
    os.symlink(".leanconv/current/b.txt", tmp_path / "b.txt")  # linked, never switched in
    (tmp_path / ".staged.a.txt").write_text("old style")
    clean_up(tmp_path)
    assert sorted(p.name for p in sets.iterdir()) == [os.readlink(tmp_path / ".leanconv" / "current").split("/")[-1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".leanconv", "a.txt"]


def test_regular_files_already_there_are_adopted_without_a_visible_change(tmp_path):
    """Files of an older leanconv (or one written alone) become part of the set, unchanged."""
    (tmp_path / "a.txt").write_text("plain a")
    (tmp_path / "b.txt").write_text("plain b")
    write_together(tmp_path, {"a.txt": _writer("a1")})
    assert _visible(tmp_path) == {"a.txt": "a1", "b.txt": "plain b"}
    assert fileset.is_set_link(tmp_path / "a.txt") and not (tmp_path / "b.txt").is_symlink()
    atomic_write(tmp_path / "a.txt", lambda p: Path(p).write_text("alone"))  # a single file over a set name
    write_together(tmp_path, {"b.txt": _writer("b2")})
    assert _visible(tmp_path) == {"a.txt": "alone", "b.txt": "b2"}


def test_set_folders_are_readable_like_any_folder(tmp_path):
    write_together(tmp_path, {"a.txt": _writer("a")})
    umask = os.umask(0)
    os.umask(umask)
    current = (tmp_path / ".leanconv" / "current").resolve()
    assert stat.S_IMODE(current.stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("follow", [True, False])
def test_a_copied_folder_takes_a_new_set_and_the_original_stays(tmp_path, follow):
    out = tmp_path / "out"
    write_together(out, {"a.txt": _writer("a1"), "b.txt": _writer("b1")})
    write_together(out, {"a.txt": _writer("a2")})
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=not follow)  # a copy that follows the links, or keeps them
    assert _visible(copy) == {"a.txt": "a2", "b.txt": "b1"}
    write_together(copy, {"b.txt": _writer("b3")})
    assert _visible(copy) == {"a.txt": "a2", "b.txt": "b3"}
    assert _visible(out) == {"a.txt": "a2", "b.txt": "b1"}
    assert len(list((copy / fileset.HIDDEN / "sets").iterdir())) == 1


@pytest.mark.parametrize("plant", ["hidden", "sets", "pointer"])
def test_a_planted_link_in_the_hidden_folder_never_leads_leanconv_elsewhere(tmp_path, plant):
    """A link planted at ``.leanconv``, ``.leanconv/sets`` or the pointer must not make a
    commit write into, or clean up, a folder that is not leanconv's own."""
    victim = tmp_path / "victim"
    (victim / "sets" / "keep").mkdir(parents=True)
    (victim / "sets" / "keep" / "data.txt").write_text("precious")
    (victim / "data.txt").write_text("precious")
    out = tmp_path / "out"
    if plant == "pointer":
        write_together(out, {"a.txt": _writer("a1")})
        pointer = out / fileset.HIDDEN / "current"
        pointer.unlink()
        os.symlink(victim, pointer)  # an absolute pointer to someone else's folder
        write_together(out, {"a.txt": _writer("a2")})
        assert _visible(out) == {"a.txt": "a2"}
    else:
        (out / fileset.HIDDEN).mkdir(parents=True) if plant == "sets" else out.mkdir()
        target, link = (victim, out / fileset.HIDDEN) if plant == "hidden" else (victim / "sets",
                                                                                   out / fileset.HIDDEN / "sets")
        os.symlink(target, link)
        with pytest.raises(LeanconvError, match="is not leanconv's own folder"):
            write_together(out, {"a.txt": _writer("a1")})
        assert not (out / "a.txt").exists()
    assert (victim / "data.txt").read_text() == "precious"
    assert (victim / "sets" / "keep" / "data.txt").read_text() == "precious"
    assert sorted(p.name for p in victim.rglob("*")) == ["data.txt", "data.txt", "keep", "sets"]


# --- what an output may replace -----------------------------------------------------------


def _special_files(folder: Path):
    """A FIFO, a socket, a foreign symbolic link and a folder (a device node too, as root)."""
    os.mkfifo(folder / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    (folder / "target").write_text("someone else's")
    os.symlink(folder / "target", folder / "link")
    (folder / "dir").mkdir()
    kinds = {"fifo": "FIFO", "sock": "socket", "link": "symbolic link", "dir": "folder"}
    if os.geteuid() == 0:
        os.mknod(folder / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
        kinds["null"] = "character device"
    return sock, kinds


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: os.lstat(p).st_mode for p in folder.iterdir()}


def test_nothing_but_a_regular_file_is_replaced(tmp_path):
    sock, kinds = _special_files(tmp_path)
    before = _modes(tmp_path)
    try:
        for name, kind in kinds.items():
            for write in (lambda p: write_text(p, "x"), lambda p: JsonlStore(p).append([{"a": 1}]),
                          lambda p: write_together(tmp_path, {name: _writer("x")})):
                with pytest.raises(LeanconvError, match=f"is a {kind}.*, not a regular file"):
                    write(tmp_path / name)
    finally:
        sock.close()
    assert _modes(tmp_path) == before and (tmp_path / "target").read_text() == "someone else's"
    with pytest.raises(LeanconvError, match="character device"):
        check_replaceable("/dev/null")


def _one_line_exit(run: subprocess.CompletedProcess, code: int) -> str:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code and len(lines) == 1 and lines[0].startswith("leanconv: error:"), run.stderr[-3000:]
    return lines[0]


def _leanconv(*args: str, cwd: Path, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "leanconv.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit if limit_bytes else None)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    run = _leanconv("train", "--model", "resnet20", "--data", "synthetic:n=64,c=3,s=16,k=4", "--epochs", "1",
                    "--batch-size", "32", "--out", str(folder / "run"), "--no-progress", cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "run" / "model.safetensors"


def test_outputs_that_are_not_regular_files_are_refused_before_any_work(small_ckpt, tmp_path):
    sock, kinds = _special_files(tmp_path)
    before = _modes(tmp_path)
    try:
        for name, kind in kinds.items():
            if kind == "folder":
                continue  # a folder named as an output file has its own message
            path = str(tmp_path / name)
            for args in (["fold", str(small_ckpt), "--out", path],
                         ["export", str(small_ckpt), "--onnx", path, "--no-latency"]):
                assert kind in _one_line_exit(_leanconv(*args, cwd=tmp_path), 2)
        out = tmp_path / "run"
        out.mkdir()
        os.mkfifo(out / "record.json")
        line = _one_line_exit(_leanconv("prune", str(small_ckpt), "--method", "l1", "--target-flops", "0.7",
                                        "--out", str(out), "--no-progress", cwd=tmp_path), 2)
        assert "record.json" in line and "FIFO" in line
        assert sorted(p.name for p in out.iterdir()) == ["record.json"]
    finally:
        sock.close()
    assert _modes(tmp_path) == {**before, "run": _modes(tmp_path)["run"]}


# --- a full disk --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "prune", "fold", "convert", "export"])
def test_a_full_disk_is_one_line_with_exit_1_and_leaves_the_old_files(small_ckpt, tmp_path, command):
    out = tmp_path / "out"
    target = {"fold": out / "f.safetensors", "export": out / "m.onnx"}.get(command, out / "model.safetensors")
    args = {
        "train": ["train", "--model", "resnet20", "--data", "synthetic:n=64,c=3,s=16,k=4", "--epochs", "1",
                  "--batch-size", "32", "--out", str(out)],
        "prune": ["prune", str(small_ckpt), "--method", "l1", "--target-flops", "0.7", "--out", str(out)],
        "fold": ["fold", str(small_ckpt), "--out", str(target)],
        "convert": ["convert", str(small_ckpt), "--to", "psconv", "--out", str(out)],
        "export": ["export", str(small_ckpt), "--onnx", str(target), "--no-latency"],
    }[command]
    out.mkdir()
    target.write_bytes(b"the file that was there")
    if command in ("train", "prune", "convert"):
        args.append("--no-progress")
    run = _leanconv(*args, cwd=tmp_path, limit_bytes=64 * 1024)
    line = _one_line_exit(run, 1)
    assert "File too large" in line and "Traceback" not in run.stderr
    assert target.read_bytes() == b"the file that was there"
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.resolve() != target.resolve()]
    assert leftovers == [], leftovers


def test_a_store_line_nested_too_deep_is_a_bad_line_not_a_crash(tmp_path, caplog):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"b": 2}\n')
    assert JsonlStore(path).read() == [{"a": 1}, {"b": 2}]  # skipped with a warning, as any bad line
    with pytest.raises(LeanconvError, match="line 2: not valid JSON \\(nested too deep\\)"):
        JsonlStore(path).read(strict=True)
