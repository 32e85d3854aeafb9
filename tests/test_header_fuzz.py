"""A mutation fuzzer over genuine checkpoint headers (issue 18): every case is refused in one
line naming the file, or loads as a model that runs; on the command line a refused case is
exit status 2, one ``leanconv: error:`` line, bounded memory and an output folder untouched.

Each case starts from a genuine checkpoint (a ResNet-20 with an edit of every leanconv layer
kind, a float64 ResNet-20 with a training record, a plain pre-activation ResNet-20) and
applies one to three random mutations to leanconv's JSON header, to the safetensors tensor
index or to its ``__metadata__``: a value of another JSON type, a deleted key or item, a huge, negative or zero number
(``1e999``, ``NaN`` and 400-digit integers written as literals), nesting thousands deep, a
very long or odd text (a lone surrogate, raw bytes that are not UTF-8, a line break), a
duplicated key, an extra key, a copy of another part of the header. Every case has its own
seeded generator, so every run on every machine tries the same bytes; no assertion reads a
weight or an output value, so none depends on floating-point rounding.
"""

from __future__ import annotations

import codecs
import copy
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.errors import LeanconvError
from leanconv.models import create

from conftest import edited_resnet

SEED = 18
LIBRARY_CASES = 800  # checkpoint.load and read_header, in process (about 20 ms each)
CLI_CASES = 8  # refused cases run through `python -m leanconv.cli.main` (a few seconds each)
CLI_MEMORY = 3 * 2**30  # the child's address space (RLIMIT_AS): an allocation past it is a traceback
CLI_RSS = 1536 * 2**20  # the child's peak resident memory must stay under this
CLI_CPU_S = 120  # RLIMIT_CPU of the child: a runaway loop is killed, and the case fails

# ---------------------------------------------------------------- genuine checkpoints


def _edited() -> nn.Module:
    """The conftest's edited ResNet-20, with a BatchNorm without momentum and training fields."""
    model = edited_resnet()
    model.layer3[1].bn2 = nn.BatchNorm2d(64, momentum=None)
    model.leanconv_meta = {**model.leanconv_meta, "dataset": {"name": "synthetic", "data_dir": None},
                           "conversions": [{"kind": "implant", "path": "layer3.0.conv2"}]}
    return model


def _float64() -> nn.Module:
    """A float64 ResNet-20 whose record holds a training run's fields (world size, epochs done)."""
    model = create("resnet20", num_classes=2, in_channels=3, input_size=8).double()
    model.leanconv_meta = {**model.leanconv_meta, "world_size": 1, "epochs_done": 3,
                           "train_config": {"epochs": 3, "lr": 0.05, "batch_size": 32},
                           "dataset": {"name": "synthetic:s=8,k=2", "data_dir": None}}
    return model


def _preact() -> nn.Module:
    model = create("preact_resnet20", num_classes=4, in_channels=1, input_size=8)
    model.leanconv_meta = {**model.leanconv_meta, "dataset": {"name": "synthetic:c=1,s=8,k=4,n=64"}}
    return model


SOURCES = {"edited": _edited, "float64": _float64, "preact": _preact}


@dataclass(frozen=True)
class Genuine:
    """A genuine checkpoint split into its tensor index, leanconv's header and the tensor bytes."""

    index: dict
    header: dict
    data: bytes
    input_shape: tuple[int, ...]


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, Genuine]:
    folder = tmp_path_factory.mktemp("genuine")
    found = {}
    for name, build in SOURCES.items():
        torch.manual_seed(0)
        path = folder / f"{name}.safetensors"
        model = build()
        checkpoint.save(model, path)
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        index = json.loads(raw[8:8 + n])
        header = json.loads(index.pop("__metadata__")["leanconv"])
        found[name] = Genuine(index, header, raw[8 + n:], tuple(model.leanconv_meta["input_shape"]))
    return found


# ---------------------------------------------------------------- JSON the standard writer cannot write


class Raw:
    """JSON text written as it is: ``1e999``, ``NaN``, a 400-digit number, nesting thousands deep."""

    def __init__(self, text: str):
        self.text = text


class Pairs(list):
    """A JSON object written from (key, value) pairs, so that a key can occur twice."""


class Unescaped(str):
    """A text written without escapes: its lone surrogates become bytes that are not UTF-8."""


def dump(value: Any) -> str:
    """``value`` as JSON text, honouring :class:`Raw`, :class:`Pairs` and :class:`Unescaped`."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Unescaped):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (dict, Pairs)):
        pairs = value if isinstance(value, Pairs) else value.items()
        return "{" + ", ".join(f"{dump(key)}: {dump(item)}" for key, item in pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(item) for item in value) + "]"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return json.dumps(value)


def _raw_bytes(exc: UnicodeEncodeError) -> tuple[bytes, int]:
    """Encoding error handler: ``\\udc80``-``\\udcff`` become the byte they stand for, other lone
    surrogates their three bytes (UTF-8 forbids both)."""
    text = exc.object[exc.start:exc.end]
    return b"".join(bytes([ord(c) - 0xDC00]) if "\udc80" <= c <= "\udcff" else c.encode("utf-8", "surrogatepass")
                    for c in text), exc.end


codecs.register_error("leanconv_fuzz_raw", _raw_bytes)


def file_bytes(index: Any, header: Any, data: bytes, metadata: Any = None) -> bytes:
    """A safetensors file: the index with leanconv's header (itself JSON) under ``__metadata__``
    (or ``metadata`` as given)."""
    metadata = {"leanconv": Unescaped(dump(header))} if metadata is None else metadata
    if isinstance(index, Pairs):
        outer = Pairs([("__metadata__", metadata), *index])
    elif isinstance(index, dict):
        outer = {"__metadata__": metadata, **index}
    else:  # the index itself was replaced: the file holds that value alone
        outer = index
    head = dump(outer).encode("utf-8", "leanconv_fuzz_raw")
    return len(head).to_bytes(8, "little") + head + data


# ---------------------------------------------------------------- mutations


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """The paths (tuples of keys and indices) into ``value`` a mutation may pick: the root,
    every key, and the first and last items of a list (a 64-item channel order would
    otherwise draw most mutations)."""
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _nodes(child, (*path, key))
    elif isinstance(value, list) and not isinstance(value, Pairs):
        for i in sorted({0, len(value) - 1} if len(value) > 2 else range(len(value))):
            found += _nodes(value[i], (*path, i))
    return found


def _get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def _set(root: Any, path: tuple, value: Any) -> Any:
    """``root`` with the value at ``path`` replaced (the root itself when ``path`` is empty)."""
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


ODD_TEXTS = ["", "\0", "\ud800", "\udfff", "a\nb", "\u202e\u0645", "\U0001f600" * 3, "é", "..", "../../etc/passwd",
             "os:system", "__import__('os')", "Linear", "Sequential", "resnet20", "synthetic", "layer1.0.conv1",
             "synthetic:n=100000000000", "synthetic:size=1024,n=10000000", "fashion-mnist", "\r", "\t\x0b\x0c"]
HUGE = [1024, 1000, 2**20, 100_000, 65_536, 10**12, 2**31, 2**63, 2**64 + 1, 1e12, 1e308, -1e308, 2**20 + 1, 100_001, Raw("1" + "0" * 400),
        Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e-999"), 5e-324]


def _scalar(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 3, 7, 16, 64])
    if kind == 1:
        return rng.choice([0.0, 0.5, 1.0, -0.0, 2.5, 1e-5])
    if kind == 2:
        return rng.choice(ODD_TEXTS)
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return [rng.choice([1, 3, "a", None])] * rng.randrange(4)
    if kind == 6:
        return {rng.choice(["type", "kwargs", "zoo", "x"]): rng.choice([1, "a", None, []])}
    return rng.choice(HUGE)


def _retype(value: Any, rng: random.Random) -> Any:
    """The value as another JSON type: 16 <-> "16" <-> [16] <-> {"16": 16} <-> null <-> true."""
    choices = [dump(value)[:50], [value], {"v": value},
               None, not value if isinstance(value, bool) else True, False, 1, 1.0, "1"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        choices += [float(value), int(value)]
    if isinstance(value, list) and value:
        choices += [value[0], {str(i): v for i, v in enumerate(value)}]
    if isinstance(value, dict):
        choices += [list(value.values()), list(value)]
    return rng.choice(choices)


def _deep(rng: random.Random) -> Raw:
    depth = rng.choice([65, 200, 1000, 5000, 100_000])
    if rng.random() < 0.5:
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a": ' * depth + "1" + "}" * depth)


def _mutate(root: Any, rng: random.Random) -> Any:
    """One random mutation of the JSON document ``root``; returns the (possibly new) root."""
    paths = _nodes(root)
    path = rng.choice(paths[1:] if len(paths) > 1 and rng.random() < 0.95 else paths)
    value = _get(root, path)
    kind = rng.choice(["retype", "retype", "delete", "delete", "huge", "negative", "zero", "deep", "long", "odd",
                       "duplicate", "extra", "scalar", "graft", "graft"])
    if kind == "delete" and path:
        parent = _get(root, path[:-1])
        del parent[path[-1]]
        return root
    if kind in ("duplicate", "extra"):
        dicts = [p for p in paths if isinstance(_get(root, p), dict)]
        if dicts:
            where = rng.choice(dicts)
            target = _get(root, where)
            if kind == "extra" or not target:
                target[rng.choice(["x", "", "__proto__", "children", "kwargs", "\0", "k" * 5000])] = _scalar(rng)
                return root
            key = rng.choice(list(target))
            pairs = list(target.items())
            twin = (key, _scalar(rng) if rng.random() < 0.7 else target[key])
            pairs.insert(rng.randrange(len(pairs) + 1), twin)
            return _set(root, where, Pairs(pairs))  # no further mutation reaches inside a Pairs
    if kind == "huge":
        new = rng.choice(HUGE)
    elif kind == "negative":
        new = -value if isinstance(value, (int, float)) and not isinstance(value, bool) and value else -1
        new = rng.choice([new, -1, -(2**63), -1e308])
    elif kind == "zero":
        new = rng.choice([0, 0.0, "", [], {}, [0], [0, 0, 0]])
    elif kind == "deep":
        new = _deep(rng)
    elif kind == "long":
        new = rng.choice(["x" * 5000, "é" * 70_000, list(range(rng.choice([300, 70_000]))), "y" * 2_000_000])
    elif kind == "odd":
        new = rng.choice(ODD_TEXTS + [Unescaped("\ud800"), Unescaped("a\udcffb")])
    elif kind == "scalar":
        new = _scalar(rng)
    elif kind == "graft":  # a copy of another part of the document: a spec of another layer, another edit's path
        new = copy.deepcopy(_get(root, rng.choice(paths)))
    else:
        new = _retype(value, rng)
    return _set(root, path, new)


@dataclass(frozen=True)
class Case:
    number: int
    source: str
    mutations: tuple[str, ...]  # where each mutation went: "header", "index" or "metadata"
    content: bytes


def make_case(number: int, genuine: dict[str, Genuine]) -> Case:
    """Case ``number``: the same bytes on every machine (one generator per case, seeded by its number)."""
    rng = random.Random(SEED * 1_000_003 + number)
    source = rng.choice(sorted(genuine))
    g = genuine[source]
    index, header = json.loads(json.dumps(g.index)), json.loads(json.dumps(g.header))
    targets = tuple(rng.choice(["header"] * 6 + ["index"] * 2 + ["metadata"]) for _ in range(rng.randint(1, 3)))
    for target in targets:
        if target == "header":
            header = _mutate(header, rng)
        elif target == "index":
            index = _mutate(index, rng)
    metadata = None
    for _ in range(targets.count("metadata")):  # __metadata__ itself, around leanconv's finished text
        metadata = _mutate(metadata or {"leanconv": Unescaped(dump(header))}, rng)
    return Case(number, source, targets, file_bytes(index, header, g.data, metadata))


# ---------------------------------------------------------------- the library: refused in one line, or loads and runs


def _refusal(exc: LeanconvError, path: Path) -> str:
    message = str(exc)
    assert message and len(message.splitlines()) == 1 and "\r" not in message, message
    assert str(path) in message, message
    return message


def check_case(case: Case, path: Path, input_shape: tuple[int, ...]) -> str | None:
    """The refusal line of ``case`` written at ``path``, or None when it loads and runs."""
    path.write_bytes(case.content)
    try:
        header = checkpoint.read_header(path)
    except LeanconvError as exc:
        _refusal(exc, path)
        header = None
    try:
        model = checkpoint.load(path)
    except LeanconvError as exc:
        return _refusal(exc, path)
    assert header is not None, "read_header refused a checkpoint that load accepts"
    shape = model.leanconv_meta.get("input_shape") or input_shape  # the shape it records, else the genuine one
    with torch.no_grad():
        out = model(torch.zeros(2, *shape, dtype=next(model.parameters()).dtype))
    assert out.shape[0] == 2 and out.dim() == 2
    return None


def test_the_same_cases_on_every_run(genuine):
    assert [make_case(n, genuine).content for n in (0, 1, 2)] == [make_case(n, genuine).content for n in (0, 1, 2)]
    assert len({make_case(n, genuine).content for n in range(20)}) == 20


def test_every_mutated_header_is_refused_in_one_line_or_loads_and_runs(genuine, tmp_path):
    refused = 0
    for number in range(LIBRARY_CASES):
        case = make_case(number, genuine)
        try:
            refused += check_case(case, tmp_path / "fuzzed.safetensors", genuine[case.source].input_shape) is not None
        except Exception as exc:  # name the case, keep its traceback
            raise AssertionError(f"fuzz case {number} ({case.source}, {case.mutations}): "
                                 f"{type(exc).__name__}: {exc}"[:2000]) from exc
    assert LIBRARY_CASES // 2 <= refused < LIBRARY_CASES  # most mutations break a header, not all


# ---------------------------------------------------------------- what the fuzzer found, kept as plain cases


def _parts(g: Genuine) -> tuple[dict, dict]:
    return json.loads(json.dumps(g.index)), json.loads(json.dumps(g.header))


def _refused(content: bytes, path: Path, *needles: str) -> None:
    path.write_bytes(content)
    with pytest.raises(LeanconvError) as err:
        checkpoint.load(path)
    message = _refusal(err.value, path)
    assert all(needle in message for needle in needles), message


def test_a_tensor_dtype_that_is_a_list_is_named(genuine, tmp_path):
    index, header = _parts(genuine["preact"])
    index["fc.bias"]["dtype"] = ["F32"]  # was a TypeError (unhashable list) in the index check
    _refused(file_bytes(index, header, genuine["preact"].data), tmp_path / "m.safetensors",
             '"fc.bias".dtype must be one of')


def test_tensors_that_overlap_or_leave_a_gap_are_named(genuine, tmp_path):
    index, header = _parts(genuine["preact"])
    index["fc.bias"]["data_offsets"] = [0, index["fc.bias"]["data_offsets"][1] - index["fc.bias"]["data_offsets"][0]]
    _refused(file_bytes(index, header, genuine["preact"].data), tmp_path / "m.safetensors",
             '.data_offsets must start where the previous tensor ends')


def test_layers_that_do_not_chain_are_refused_before_they_run(genuine, tmp_path):
    index, header = _parts(genuine["edited"])
    depthwise = next(e for e in header["edits"] if e["path"] == "layer2.0.conv2")["module"]["children"][0]
    del depthwise["kwargs"]["padding"]  # the weights still fit; a forward pass did not (a RuntimeError)
    _refused(file_bytes(index, header, genuine["edited"].data), tmp_path / "m.safetensors",
             "does not run on its input shape [3, 16, 16]")


def test_a_model_that_outputs_other_than_its_classes_is_refused(genuine, tmp_path):
    index, header = _parts(genuine["preact"])
    header["meta"]["num_classes"] = 7
    _refused(file_bytes(index, header, genuine["preact"].data), tmp_path / "m.safetensors",
             "meta.num_classes (7)")


def test_a_layer_output_too_large_for_one_image_is_refused_before_it_is_allocated(tmp_path):
    model = create("resnet20", num_classes=2, input_size=1024)
    model.conv1 = nn.Conv2d(3, 16, 3, padding=1024, bias=False)  # 16 x 3070 x 3070 values for each image
    checkpoint.save(model, tmp_path / "wide.safetensors")
    with pytest.raises(LeanconvError, match=r"outputs over .* values from Conv2d .* for one \[3, 1024, 1024\] image"):
        checkpoint.load(tmp_path / "wide.safetensors")


# ---------------------------------------------------------------- the command line: exit 2, one line, nothing touched


COMMANDS = [["eval", "{ckpt}", "--batch-size", "8"],
            ["profile", "{ckpt}", "--no-latency"],
            ["fold", "{ckpt}", "--out", "{out}/model.safetensors", "--no-latency"],
            ["prune", "{ckpt}", "--target-flops", "0.5", "--out", "{out}", "--no-progress"]]


# `python -m leanconv.cli.main ARGV` under the limits above, set in the child itself (no preexec_fn,
# which is unsafe in a parent that runs threads)
LIMITED = ("import resource, runpy, sys\n"
           "for kind, limit in ((resource.RLIMIT_AS, {memory}), (resource.RLIMIT_CPU, {cpu})):\n"
           "    resource.setrlimit(kind, (limit, limit))\n"
           "sys.argv = ['leanconv', *sys.argv[1:]]\n"
           "runpy.run_module('leanconv.cli.main', run_name='__main__', alter_sys=True)\n")


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, int]:
    """Exit status, stderr and peak resident bytes of ``python -m leanconv.cli.main *argv``
    under the memory and CPU limits above."""
    code = LIMITED.format(memory=CLI_MEMORY, cpu=CLI_CPU_S)
    with open(cwd / "stdout", "wb") as out, open(cwd / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, (cwd / "stderr").read_bytes().decode("utf-8", "replace"), usage.ru_maxrss * 1024


def _cli_cases(genuine: dict[str, Genuine], tmp: Path) -> list[Case]:
    """The first ``CLI_CASES`` refused cases past the library's share, one source after another."""
    found: list[Case] = []
    number = LIBRARY_CASES
    while len(found) < CLI_CASES:
        case = make_case(number, genuine)
        number += 1
        if case.source != sorted(genuine)[len(found) % len(genuine)]:
            continue
        if check_case(case, tmp / "probe.safetensors", genuine[case.source].input_shape) is not None:
            found.append(case)
    return found


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_cases_on_the_command_line_are_one_line_exit_2_and_touch_nothing(genuine, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.safetensors", "record.json", "notes.txt"):
        (out / name).write_bytes(f"earlier {name}\n".encode() + bytes(range(256)))
    before = _snapshot(out)
    for i, case in enumerate(_cli_cases(genuine, tmp_path)):
        ckpt = tmp_path / f"case{case.number}.safetensors"
        ckpt.write_bytes(case.content)
        argv = [a.format(ckpt=ckpt, out=out) for a in COMMANDS[i % len(COMMANDS)]]
        code, err, rss = run_cli(argv, tmp_path)
        lines = err.splitlines()
        where = f"fuzz case {case.number} ({case.source}, {case.mutations}) with {argv[0]}: {err[-1500:]}"
        assert code == 2, where
        assert len(lines) == 1 and lines[0].startswith("leanconv: error:") and "Traceback" not in err, where
        assert str(ckpt) in lines[0], where  # refused for the file, not for an argument
        assert rss < CLI_RSS, where
        assert _snapshot(out) == before, where
        assert ckpt.read_bytes() == case.content, where
