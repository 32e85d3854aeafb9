"""A deterministic fuzzer over every subcommand's arguments (issue 18).

For every command a valid base command line reaches the command's work, which a trip wire
replaces (``test_every_base_reaches_its_work``). Each case takes a base and replaces one or two
of its values with hostile ones: numbers out of range, 0, nan, inf, 1e309, non-numbers, empty
and 10k-character strings, unicode, unknown choices, a FIFO or a device as a path, a path
under a file. Every case must be refused before any work: exit status 2, one line on stderr
starting ``leanconv: error:``, nothing on stdout, no traceback, the files around it (an output
folder with known files, the FIFO, /dev/null) untouched, and memory bounded. A case that trips
the wire means the generator made a valid value, or leanconv checks a value only after work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.models import create
from leanconv.util.limits import (MAX_BATCH, MAX_BLOCKS, MAX_CLASSES, MAX_EPOCHS, MAX_GROUPS, MAX_IMAGES, MAX_PROBES,
                                  MAX_REPEATS, MAX_SAMPLES, MAX_SIDE, MAX_STEPS, MAX_TEMPERATURE, MAX_THREADS,
                                  SEED_MAX)

SEED = 18  # the fuzzer's own seed: the same cases on every run
CASES = 3000  # cases CI runs: about 40 s on two cores
TWO_VALUES = 0.3  # share of cases that make two values hostile at once
CASE_SECONDS = 20  # a case that takes longer is hung (a FIFO opened, work started)
MEMORY_GROWTH_MIB = 300  # peak resident memory may grow by at most this over the whole batch


class Tripwire(BaseException):
    """Raised where a command's work would start (not an Exception: nothing may swallow it)."""


# The function each command calls once every check has passed (patched to raise Tripwire).
WORK = {
    "demo": "leanconv.cli.demo._baseline", "import": "leanconv.checkpoint.save", "train": "leanconv.cli.train.fit",
    "eval": "leanconv.cli.eval.evaluate", "profile": "leanconv.cli.profile.profile",
    "sensitivity": "leanconv.cli.sensitivity.run_sensitivity", "prune": "leanconv.cli.prune.run_prune",
    "prune3d": "leanconv.cli.prune3d.run_prune3d", "convert": "leanconv.cli.convert.run_convert",
    "explore": "leanconv.cli.explore.run_explore", "compare": "leanconv.cli.compare.run_compare",
    "export": "leanconv.cli.export.export_onnx", "fold": "leanconv.cli.fold.fold",
    "latency-table": "leanconv.cli.latency_table.solver_configs",
}  # report: its one argument is the folder build_report reads, refused as it reads it


# ---------------------------------------------------------------- the world the cases run in


@dataclass(frozen=True)
class World:
    root: Path
    ckpt: str  # a ResNet-20 for synthetic data (3 x 16 x 16, 4 classes), untrained
    weights: str  # its state dict, for import
    out: str  # an output folder that exists and holds known files
    fifo: str
    afile: str  # a regular file
    folder: str  # an empty folder
    missing: str  # a path in a folder that does not exist


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = create("resnet20", num_classes=4, in_channels=3, input_size=16)
    model.leanconv_meta = {**model.leanconv_meta, "input_shape": [3, 16, 16], "num_classes": 4,
                           "dataset": {"name": "synthetic", "data_dir": None}}
    checkpoint.save(model, root / "model.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights.safetensors"))
    out = root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own notes\n")
    (out / "model.safetensors").write_bytes(b"a model of an earlier run")
    (out / "record.json").write_text('{"earlier": true}\n')
    (out / "model.onnx").write_bytes(b"an earlier export")
    (root / "empty").mkdir()
    (root / "cwd").mkdir()
    os.mkfifo(root / "fifo")
    (root / "afile").write_text("a regular file\n")
    return World(root=root, ckpt=str(root / "model.safetensors"), weights=str(root / "weights.safetensors"),
                 out=str(out), fifo=str(root / "fifo"), afile=str(root / "afile"), folder=str(root / "empty"),
                 missing=str(root / "no-such-folder" / "x.safetensors"))


def bases(w: World) -> dict[str, list[tuple[str, str | None]]]:
    """A valid command line per command, as (option or "<pos>", value) pairs: each reaches its work."""
    data = ("--data", "synthetic:n=64,s=8")
    return {
        "demo": [("--out", w.out), ("--data", "synthetic:n=64,s=8"), ("--no-progress", None)],
        "import": [("--constructor", "leanconv.models.resnet_cifar:resnet20"), ("--weights", w.weights),
                   ("--input-shape", "3,16,16"), ("--arg", "num_classes=4"), ("--out", f"{w.out}/model.onnx")],
        "train": [("--model", "resnet20"), data, ("--epochs", "1"), ("--batch-size", "16"), ("--out", w.out),
                  ("--no-progress", None)],
        "eval": [("<pos>", w.ckpt), ("--batch-size", "64")],
        "profile": [("<pos>", "resnet20"), ("--input-shape", "3,16,16"), ("--repeats", "2")],
        "sensitivity": [("<pos>", w.ckpt), ("--probes", "4"), ("--score-images", "16"), ("--out", w.out),
                        ("--no-progress", None)],
        "prune": [("<pos>", w.ckpt), ("--target-flops", "0.5"), ("--method", "l1"), ("--score-images", "16"),
                  ("--out", w.out), ("--no-progress", None)],
        "prune3d": [("<pos>", w.ckpt), ("--target-flops", "0.5"), ("--samples", "4"), ("--out", w.out),
                    ("--no-progress", None)],
        "convert": [("<pos>", "resnet20"), ("--to", "scc"), ("--groups", "2"), ("--data", "synthetic"),
                    ("--out", w.out), ("--no-progress", None)],
        "explore": [("--model", "resnet20"), data, ("--scc-groups", "2"), ("--scc-overlap", "0.5"), ("--epochs", "1"),
                    ("--out", w.out), ("--no-progress", None)],
        "compare": [("<pos>", w.ckpt), ("--target-flops", "0.5"), ("--methods", "l1"), ("--out", w.out),
                    ("--no-progress", None)],
        "export": [("<pos>", "resnet20"), ("--input-shape", "3,16,16"), ("--onnx", f"{w.out}/model.onnx"),
                   ("--no-latency", None)],
        "fold": [("<pos>", w.ckpt), ("--out", f"{w.out}/model.safetensors"), ("--no-latency", None)],
        "latency-table": [("<pos>", w.ckpt), ("--out", f"{w.out}/table.json"), ("--no-progress", None)],
        "report": [("<pos>", w.folder)],
    }


# ---------------------------------------------------------------- hostile values, by family

LONG = "x" * 10_000
GARBAGE = ["", "abc", LONG, "é", "\u202e12", "🙂", "None", "true", "a\nb", " "]


def whole(low: int, high: int) -> list[str]:
    """Text that is not a whole number in [low, high]."""
    return [*GARBAGE, str(high + 1), str(low - 1), "-1", "99999999999999999999", "-99999999999999999999", "9" * 5000,
            "1e309", "nan", "inf", "-inf", "1.5", "0x10", "1,2", f"{low}.0"]


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> list[str]:
    """Text that is not a finite number in the range (open at the ends so marked)."""
    values = [*GARBAGE, "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e300", "-1", "1,2", "0x1p0"]
    values += [str(low)] if low_open else []
    values += [str(high)] if high_open else []
    values += ["1e-400"] if low_open and low == 0 else []  # rounds to 0.0
    return [v for v in values if not _inside(v, low, high, low_open, high_open)]


def _inside(text: str, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    try:
        v = float(text)
    except ValueError:
        return False
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


FRACTION = number(0, 1, low_open=True, high_open=True)
CHOICE = ["", "nope", LONG, "é", "HAP", "a\nb"]
SHAPES = ["", "abc", "3", "3,16", "3,16,16,16", "0,16,16", "3,0,16", "-3,16,16", "3,-16,16", "300,16,16",
          "3,2048,2048", "3,99999999999999999999,16", "9" * 5000 + ",16,16", "3.0,16,16", "nan,16,16", "3,16,16,",
          "256,1024,1024", LONG, "é,16,16"]
PAIRS = ["", "noequals", "=1", "1a=2", "é=1", "a\nb=1", LONG, "num_classes=0", "num_classes=-1",
         "num_classes=1000000000000", "num_classes=nan", "in_channels=0", "in_channels=100000", "input_size=99999",
         "input_size=1e309", "nope=1", "num_classes=" + "9" * 5000, "num_classes=" + LONG,
         "num_classes=" + "[" * 100_000, "num_classes=[1, 2]", "in_channels=true"]
CONSTRUCTORS = ["", "nope", ":", "a:", ":b", "no.such.module:fn", "leanconv.models:nope", LONG, "é:é", "a\nb:c"]
MODELS = ["", "nope", "resnet999", "no.such.module:fn", LONG, "é", "a\nb"]


def datasets(w: World) -> list[str]:
    return ["", "nope", ":", "synthetic:=1", "synthetic:n", "synthetic:bogus=1", "synthetic:é=1", LONG, "é",
            "synthetic:n=99999999999", "synthetic:n=-1", "synthetic:n=nan", "synthetic:n=1e309", "synthetic:n=9",
            "synthetic:s=100000", "synthetic:s=0", "synthetic:c=0", "synthetic:c=100000", "synthetic:k=1",
            "synthetic:k=99999999999999999999", "synthetic:seed=-1", "synthetic:seed=4294967296", "synthetic:n_test=0",
            "synthetic:val_size=-1", "synthetic:val_size=99999999999", "synthetic:n=64,val_size=64",
            "synthetic:flip_ok=maybe", "synthetic:n=" + "9" * 5000, "synthetic:" + LONG, "synthetic:n=10000000,s=1024",
            "synthetic:n=true", "synthetic:s=8,k=6", "imagefolder:/dev/null", f"imagefolder:{w.fifo}",
            f"npz:{w.missing}", f"npz:{w.fifo}", f"imagefolder:{w.folder},size=0", f"imagefolder:{w.folder},channels=2",
            f"imagefolder:{w.folder},max_memory_mb=-1", f"npz:{w.afile},size=99999", "imagefolder:", "cifar10:n=5",
            "fashion-mnist:val_size=-5"]


def read_paths(w: World) -> list[str]:
    """Paths that are no readable checkpoint (or state dict, or results folder)."""
    return ["", "/dev/null", "/dev/zero", w.fifo, w.missing, LONG, f"{w.root}/{'y' * 300}", w.afile, w.folder,
            "é/ü.safetensors", f"{w.afile}/x", "a\nb"]


def out_folders(w: World) -> list[str]:
    return ["", "/dev/null", w.fifo, f"{w.afile}/sub", "/dev/null/sub", LONG, f"{w.root}/{'y' * 300}", w.afile]


def out_files(w: World) -> list[str]:
    return ["", "/dev/null", w.fifo, w.folder, f"{w.afile}/x", "/dev/null/x", LONG, f"{w.root}/{'y' * 300}"]


def data_dirs(w: World) -> list[str]:
    return ["", "/dev/null", w.fifo, w.missing, w.afile, LONG, f"{w.root}/{'y' * 300}", w.folder]


@dataclass(frozen=True)
class Opt:
    """An option to make hostile: its values, the base option it replaces, and other options it
    needs set so that its value matters (a data folder is read only for data that has files)."""

    flag: str
    values: tuple[str, ...]
    replaces: str | None = None
    also: tuple[tuple[str, str], ...] = ()


def options(w: World) -> dict[str, list[Opt]]:
    """Every option of every command that takes a value, with its hostile values."""
    def o(flag, values, **kw):
        return Opt(flag, tuple(values), **kw)

    data = o("--data", datasets(w))
    data_dir = o("--data-dir", data_dirs(w), also=(("--data", "fashion-mnist"),))
    shape = o("--input-shape", SHAPES)
    ckpt = o("<pos>", read_paths(w))
    out = o("--out", out_folders(w))
    seed = o("--seed", whole(0, SEED_MAX))
    batch = o("--batch-size", whole(1, MAX_BATCH))
    repeats = o("--repeats", whole(1, MAX_REPEATS))
    threads = o("--threads", whole(1, MAX_THREADS))
    ft_epochs = o("--finetune-epochs", whole(0, MAX_EPOCHS))
    ft_lr = o("--finetune-lr", number(0, 1000, low_open=True))
    subset = o("--train-subset", whole(1, MAX_IMAGES))
    score = o("--score-images", whole(1, MAX_IMAGES))
    probes = o("--probes", whole(2, MAX_PROBES))
    method = o("--method", CHOICE)
    normalize = o("--normalize", CHOICE)
    run = [seed, ft_epochs, ft_lr, subset, score, probes, repeats, data, data_dir, shape, ckpt, out]
    timing = [o("--runtime", CHOICE), threads, o("--batch", whole(1, MAX_BATCH)),
              o("--latency-table", read_paths(w))]
    return {
        "demo": [out, data, data_dir, o("--runtime", CHOICE), o("--batch", whole(1, MAX_BATCH))],
        "import": [o("--constructor", CONSTRUCTORS), o("--weights", read_paths(w)), shape,
                   o("--num-classes", whole(1, MAX_CLASSES)), o("--arg", PAIRS), data, data_dir,
                   o("--out", out_files(w))],
        "train": [o("--model", MODELS), o("--from", read_paths(w), replaces="--model"), o("--arg", PAIRS), data,
                  data_dir, batch, o("--epochs", whole(1, MAX_EPOCHS)), o("--lr", number(0, 1000, low_open=True)),
                  o("--momentum", number(0, 1, high_open=True)), o("--weight-decay", number(0, 1000)),
                  o("--schedule", CHOICE), seed, o("--resolution", whole(1, MAX_SIDE)),
                  o("--train-subset", whole(1, MAX_IMAGES)), threads, out],
        "eval": [ckpt, shape, data, data_dir, batch, o("--split", CHOICE)],
        "profile": [o("<pos>", [*MODELS, *read_paths(w)]), shape, o("--num-classes", whole(1, MAX_CLASSES)), repeats,
                    threads, o("--arg", PAIRS)],
        "sensitivity": [ckpt, probes, o("--hessian", CHOICE), o("--min-probes", whole(2, 4)), o("--rel-stderr", number(0, 1, low_open=True)),
                        o("--probe-groups", [v for v in whole(1, MAX_GROUPS) if v != "layer"]), score, seed, batch,
                        o("--cache-dir", out_folders(w)), data, data_dir, shape, out],
        "prune": [*run, *timing, o("--target-flops", FRACTION),
                  o("--target-params", FRACTION, replaces="--target-flops"),
                  o("--target-latency", FRACTION, replaces="--target-flops"), o("--candidates", whole(1, 1000)),
                  method,
                  o("--implant", number(0, 1, high_open=True)), o("--implant-init", CHOICE), normalize,
                  o("--round-to", whole(1, MAX_GROUPS)), o("--steps", whole(1, MAX_STEPS)), batch,
                  o("--hessian", CHOICE), o("--hap-form", CHOICE),
                  o("--distill-temperature", number(0, MAX_TEMPERATURE, low_open=True)),
                  o("--distill-weight", number(0, 1)), o("--regularize-epochs", whole(0, MAX_EPOCHS)),
                  o("--regularize-strength", number(0, 1000, low_open=True))],
        "prune3d": [*run, o("--target-flops", FRACTION), o("--samples", whole(4, MAX_SAMPLES)),
                    o("--mixed", whole(0, 3)), method, normalize, o("--sample-epochs", whole(0, MAX_EPOCHS)),
                    o("--sample-images", whole(1, MAX_IMAGES)), batch, o("--w-min", FRACTION),
                    o("--r-min", number(0, 1, low_open=True)), o("--min-blocks-per-stage", whole(1, MAX_BLOCKS)),
                    o("--executor", CHOICE), o("--ray-address", ["", "auto", LONG, "é", "localhost:6379"]),
                    o("--workers", whole(0, MAX_THREADS)), threads],
        "convert": [o("<pos>", [*MODELS, *read_paths(w)]), o("--to", CHOICE), o("--groups", whole(1, MAX_GROUPS)),
                    o("--overlap", number(0, 1, high_open=True)), o("--pattern", CHOICE), seed, ft_epochs, ft_lr,
                    subset, batch, repeats, data, data_dir, shape, o("--num-classes", whole(1, MAX_CLASSES)),
                    o("--arg", PAIRS), out],
        "explore": [o("--model", MODELS), data, data_dir, batch,
                    o("--scc-groups", ["0", "-1", "2,0", "99999999999999999999", "1.5", "abc", LONG, "",
                                       ",".join(str(g) for g in range(1, 1001))]),
                    o("--scc-overlap", ["1", "-0.1", "0.5,1", "nan", "inf", "1e309", "abc", LONG, "",
                                        ",".join(f"0.{i:04d}" for i in range(1, 1001))]),
                    o("--psconv-patterns", ["nope", "psd4_p8,nope", LONG, "é"]), o("--epochs", whole(1, MAX_EPOCHS)),
                    o("--train-subset", whole(1, MAX_IMAGES)), o("--lr", number(0, 1000, low_open=True)), seed,
                    threads, repeats, out],
        "compare": [*run, *timing, o("--target-flops", [*FRACTION, "0.5,1", "0.5,nan", ",",
                                                        ",".join(f"0.{i:04d}1" for i in range(1, 1001))]),
                    o("--target-latency", [*FRACTION, "0.5,1", ","], replaces="--target-flops"),
                    o("--methods", ["", "nope", "l1,nope", ",", LONG, "é", "L1"]),
                    o("--samples", whole(4, MAX_SAMPLES)),
                    o("--onnx-opset", whole(7, 30)), o("--scc-groups", whole(1, MAX_GROUPS)),
                    o("--scc-overlap", number(0, 1, high_open=True)), o("--psconv-pattern", CHOICE)],
        "export": [o("<pos>", [*MODELS, *read_paths(w)]), o("--onnx", out_files(w)), o("--opset", whole(7, 30)), shape,
                   repeats, threads, o("--arg", PAIRS)],
        "fold": [ckpt, o("--out", out_files(w)), repeats, shape],
        "latency-table": [ckpt, o("--out", out_files(w)), o("--runtime", CHOICE), threads,
                          o("--batch", whole(1, MAX_BATCH)), shape],
        "report": [o("<pos>", [*read_paths(w), w.out])],
    }


# ---------------------------------------------------------------- cases


def render(command: str, pairs: list[tuple[str, str | None]]) -> list[str]:
    argv = [command]
    for flag, value in pairs:
        if flag == "<pos>":
            argv.append(value)
        elif value is None:
            argv.append(flag)
        else:
            argv.append(f"{flag}={value}")  # "=": a value such as "-inf" is never read as an option
    return argv


def make_cases(w: World, count: int = CASES, seed: int = SEED) -> list[list[str]]:
    """``count`` command lines, each with one or two hostile values (fixed by ``seed``): the
    commands in turn, each command's options in turn, the values and a second option at random."""
    rng = random.Random(seed)
    base, opts = bases(w), options(w)
    commands = sorted(opts)
    cases = []
    for i in range(count):
        command = commands[i % len(commands)]
        first = opts[command][(i // len(commands)) % len(opts[command])]
        others = [opt for opt in opts[command] if opt is not first]
        chosen = [first, *([rng.choice(others)] if others and rng.random() < TWO_VALUES else [])]
        pairs = list(base[command])
        for opt in chosen:
            drop = {opt.flag, opt.replaces} | {flag for flag, _ in opt.also}
            pairs = [p for p in pairs if p[0] not in drop]
            pairs += [*opt.also, (opt.flag, rng.choice(opt.values))]
        cases.append(render(command, pairs))
    return cases


# ---------------------------------------------------------------- running them


def snapshot(w: World) -> dict[str, str]:
    """What every file around the cases is: kind and content hash (FIFOs and devices by kind)."""
    seen = {}
    for path in sorted(w.root.rglob("*")):
        mode = path.lstat().st_mode
        seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    seen["/dev/null"] = stat.S_IFMT(os.lstat("/dev/null").st_mode)
    return seen


@contextlib.contextmanager
def deadline(seconds: float):
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s (hung, or work started)")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(argv: list[str], capsys) -> tuple[object, str, str]:
    """main(argv) -> (exit status or the exception it raised, stdout, stderr)."""
    capsys.readouterr()
    try:
        with deadline(CASE_SECONDS):
            code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    except (Tripwire, Exception) as exc:  # noqa: BLE001 - reported as the case's failure
        code = exc
    out, err = capsys.readouterr()
    return code, out, err


def problem(argv: list[str], code: object, out: str, err: str) -> str | None:
    """What is wrong with one refused case's outcome (None when nothing is)."""
    lines = err.splitlines()
    if isinstance(code, Tripwire):
        return "started work: every value here should be refused before"
    if isinstance(code, BaseException):
        return f"raised {type(code).__name__}: {str(code)[:200]}"
    if code != 2:
        return f"exit status {code}, not 2; stderr {err[:300]!r}"
    if out:
        return f"wrote to stdout: {out[:200]!r}"
    if len(lines) != 1 or not lines[0].startswith("leanconv: error:") or "Traceback" in err:
        return f"stderr is not one 'leanconv: error:' line: {err[:400]!r}"
    return None


@pytest.fixture
def tripwires(monkeypatch, world):
    """Every command's work raises Tripwire; the cases run in an empty folder of their own."""
    import importlib

    def trip(*args, **kwargs):
        raise Tripwire()

    for target in WORK.values():
        module, _, name = target.rpartition(".")
        monkeypatch.setattr(importlib.import_module(module), name, trip)
    monkeypatch.chdir(world.root / "cwd")


def _shown(argv: list[str]) -> str:
    return " ".join(a if len(a) <= 80 else a[:40] + f"...[{len(a)} chars]" for a in argv)


def test_every_base_reaches_its_work(world, tripwires, capsys):
    """The bases are valid: a fuzz case is refused for its hostile value, not for the base."""
    for command, pairs in bases(world).items():
        if command not in WORK:
            continue
        code, out, err = run_case(render(command, pairs), capsys)
        assert isinstance(code, Tripwire), (command, code, err)


def test_the_cases_are_fixed_and_cover_every_option(world):
    cases = make_cases(world)
    assert len(cases) == CASES and cases == make_cases(world)
    made = {(argv[0], a.split("=", 1)[0]) for argv in cases for a in argv[1:] if a.startswith("--")}
    wanted = {(command, opt.flag) for command, opts in options(world).items() for opt in opts if opt.flag != "<pos>"}
    assert wanted <= made, sorted(wanted - made)


def test_hostile_arguments_are_refused_before_work(world, tripwires, capsys):
    cases = make_cases(world)
    before = snapshot(world)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started, failures = time.perf_counter(), []
    for argv in cases:
        code, out, err = run_case(argv, capsys)
        wrong = problem(argv, code, out, err)
        if wrong is None and snapshot(world) != before:
            wrong = "changed the files around it"
        if wrong:
            failures.append(f"{_shown(argv)}\n    {wrong}")
            before = snapshot(world)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    print(f"{len(cases)} cases in {time.perf_counter() - started:.1f} s; peak memory grew {grown:.0f} MiB")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])
    assert grown <= MEMORY_GROWTH_MIB
