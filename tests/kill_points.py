"""Failure injection: a leanconv command killed at every file-system step, then run again.

    python tests/kill_points.py SPEC.json RESULTS

SPEC holds ``argv`` (a leanconv command line), ``folder`` (its output folder), ``before``
(the command line of an earlier run into the same folder, whose files every run starts from:
``RESULTS/template``; or null for an empty start),
``resume`` (``[file, flag]``: when ``folder/file`` exists after the kill, the rerun adds
``flag``; or null) and ``reruns``: ``"all"``, ``"edges"``, ``"last"`` or a list of ks.

A file-system step is one call, on a path in the output folder, of ``os.replace``, ``rename``, ``link``, ``symlink``,
``unlink``, ``remove``, ``rmdir``, ``mkdir`` or ``fsync``, or one ``shutil.rmtree``; the data
a process writes between two steps goes to files that no step has yet made visible.

1. One uninterrupted run copies the folder to ``RESULTS/states/k`` just before its k-th step
   (k = 1..N), and to ``RESULTS/states/N+1`` at the end: ``states/k`` is what a SIGKILL at
   that moment leaves on disk. ``RESULTS/summary.json`` lists, per k, the *visible* state
   (every file outside ``.leanconv`` folders and temporary names, links followed, by content).
2. For the chosen ks (``"all"``: every k; ``"edges"``: the first and the last k of every run of
   equal visible states; ``"last"``: the last k of each, where most is left half done), a
   child really sends itself SIGKILL just before step k (``RESULTS/k/killed``), then the
   command runs again without a kill, with the resume flag when it applies
   (``RESULTS/k/rerun``).

Commands run in children forked from this process, which imports leanconv once and never
computes (no thread pool is forked), so a run costs the command's work, not an interpreter.
Latency is not measured in the children (every timed call reads 1 ms): timing has no part
in which files are written, and it would be most of a small run's time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from leanconv.cli.main import main

STEPS = ("replace", "rename", "link", "symlink", "unlink", "remove", "rmdir", "mkdir", "fsync")
TIME_LIMIT_S = 300  # a child that hangs is killed and reported
HIDDEN = ".leanconv"


def _install(on_step, folder: Path) -> list[bool]:
    """Call ``on_step(what)`` before every file-system step of this (child) process on a path
    in ``folder``; returns the flag that, set, stops the counting."""
    inside = [False]
    root = os.path.abspath(folder)

    def ours(args) -> bool:
        return any(isinstance(a, (str, os.PathLike)) and os.path.abspath(a).startswith(root) for a in args)

    def step(what: str) -> None:
        inside[0] = True  # what on_step does (copying, killing) is not a step
        try:
            on_step(what)
        finally:
            inside[0] = False

    def wrap(fn):
        def counted(*args, **kwargs):
            if not inside[0] and ours(args):
                step(f"{fn.__name__} {' '.join(map(str, args))}")
            return fn(*args, **kwargs)
        return counted

    for name in STEPS:
        setattr(os, name, wrap(getattr(os, name)))
    rmtree = shutil.rmtree

    def one_step_rmtree(*args, **kwargs):
        if not inside[0] and ours(args[:1]):
            step(f"rmtree {args[0]}")
        was, inside[0] = inside[0], True
        try:
            return rmtree(*args, **kwargs)
        finally:
            inside[0] = was

    shutil.rmtree = one_step_rmtree
    return inside


def _no_timing() -> None:
    """Every timed call of leanconv reads 1 ms, without running the model."""
    import numpy as np

    from leanconv.cost import latency
    from leanconv.deploy import onnx

    from leanconv.cost import latency_table, runtimes, side_by_side

    def time_calls(call, warmup, repeats, clock="wall"):
        return np.ones(repeats)

    def prepare(model, input_shape, *, runtime="onnxruntime", threads=1, batch=1):
        return runtimes.Prepared(runtime, threads, batch, lambda: None, "contiguous")

    latency.time_calls = onnx.time_calls = side_by_side.time_calls = time_calls
    original = runtimes.prepare  # wherever it was imported by name already, and where it will be
    for module in [m for m in sys.modules.values() if getattr(m, "prepare", None) is original]:
        module.prepare = prepare
    runtimes.prepare = side_by_side.prepare = latency_table.prepare = prepare


def _copy(folder: Path, to: Path) -> None:
    if folder.exists():
        shutil.copytree(folder, to, symlinks=True)
    else:
        to.mkdir(parents=True)
        (to.parent / f"{to.name}.absent").touch()


def _child(argv: list[str], log: Path, folder: Path, *, kill_at: int | None = None,
           states: Path | None = None) -> tuple[str, int]:
    """Run ``argv`` in a forked child that SIGKILLs itself just before step ``kill_at`` or
    copies ``folder`` to ``states/k`` before each step k; returns (how it ended, steps)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        signal.alarm(TIME_LIMIT_S)
        counter = [0]
        trace = open(log.with_suffix(".steps"), "w")

        def on_step(what: str) -> None:
            counter[0] += 1
            trace.write(f"{counter[0]} {what}\n")
            trace.flush()
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if states is not None:
                _copy(folder, states / str(counter[0]))

        _no_timing()
        quiet = _install(on_step, folder)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # a traceback is a result too: it goes to the log
            import traceback

            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        quiet[0] = True
        if states is not None:
            _copy(folder, states / str(counter[0] + 1))
        os.write(write, str(counter[0]).encode())
        os._exit(int(code or 0))
    os.close(write)
    with os.fdopen(read) as pipe:
        counted = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}", -1
    return f"exit {os.WEXITSTATUS(status)}", int(counted or -1)


def is_temporary(name: str) -> bool:
    """A name leanconv writes before a rename, never one a reader should see."""
    return name == HIDDEN or name.endswith(".tmp") or name.startswith(".staged.")


def visible(folder: Path) -> dict[str, str]:
    """What a reader of ``folder`` sees: relative path -> sha256 of every file, links followed,
    outside ``.leanconv`` folders and temporary names."""
    seen = {}
    if not folder.is_dir():
        return seen
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        for name in sorted(files):
            if is_temporary(name):
                continue
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.exists():  # a link to nothing is no file to a reader
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def _reset(folder: Path, template: Path | None) -> None:
    if folder.exists() or folder.is_symlink():
        shutil.rmtree(folder)
    if template is not None and template.exists():
        shutil.copytree(template, folder, symlinks=True)


def _edges(views: list[str], first: bool = True) -> list[int]:
    """The first (with ``first``) and the last k (1-based) of every run of equal visible states."""
    ks = set()
    for i, view in enumerate(views):
        if first and (i == 0 or views[i - 1] != view):
            ks.add(i + 1)
        if i == len(views) - 1 or views[i + 1] != view:
            ks.add(i + 1)
    return sorted(ks)


def run(spec: dict, results: Path) -> dict:
    folder, argv, template = Path(spec["folder"]), spec["argv"], None
    results.mkdir(parents=True, exist_ok=True)
    _reset(folder, None)
    if spec.get("before"):
        ended, _ = _child(spec["before"], results / "before.log", folder)
        if ended != "exit 0":
            return {"run": f"before: {ended}", "steps": 0, "points": []}
        template = results / "template"
        shutil.copytree(folder, template, symlinks=True)
    ended, steps = _child(argv, results / "states.log", folder, states=results / "states")
    summary: dict = {"run": ended, "steps": steps, "views": [], "points": []}
    if ended != "exit 0":
        return summary
    views = [json.dumps(visible(results / "states" / str(k)), sort_keys=True) for k in range(1, steps + 2)]
    summary["views"] = views
    how = spec.get("reruns", "edges")
    chosen = {"all": range(1, steps + 1), "edges": _edges(views[:-1]), "last": _edges(views[:-1], False)}.get(how, how)
    for k in chosen:
        _reset(folder, template)
        point = {"k": k, "killed": _child(argv, results / f"{k}.killed.log", folder, kill_at=k)[0]}
        _copy(folder, results / str(k) / "killed")
        again = list(argv)
        if spec.get("resume") and (folder / spec["resume"][0]).exists():
            again.append(spec["resume"][1])
        point["resumed"] = again != argv
        point["rerun"] = _child(again, results / f"{k}.rerun.log", folder)[0]
        _copy(folder, results / str(k) / "rerun")
        summary["points"].append(point)
    return summary


if __name__ == "__main__":
    spec_path, out = sys.argv[1], Path(sys.argv[2])
    summary = run(json.loads(Path(spec_path).read_text()), out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
