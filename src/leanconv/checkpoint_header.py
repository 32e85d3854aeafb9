"""A checkpoint's header, read and checked against its schema before anything is built.

A ``.safetensors`` file starts with a JSON header: the tensor index (per tensor its dtype,
shape and byte range) and ``__metadata__``, whose ``leanconv`` entry holds leanconv's own
JSON (:mod:`leanconv.checkpoint`). Both come from the file, so both are checked here, field
by field, before leanconv builds or allocates anything:

* the index: known dtypes, shapes of at most 8 sides, byte ranges inside the file whose
  length is the shape's size (so the index cannot claim more tensor than the file holds)
  and that follow one another without gap or overlap;
* the leanconv header: ``format`` 1; ``base`` names one zoo model (its ``num_classes``,
  ``in_channels`` and ``input_size`` within :mod:`leanconv.util.limits`, its other
  arguments plain small values) or a user constructor; every edit an ``op``, a dotted
  ``path`` and a layer spec whose type is registered and whose every argument has its kind
  and range (:data:`SPEC_ARGS`); ``meta`` a record whose fields leanconv reads have their
  kinds and ranges (``input_shape`` three small positive whole numbers, ``num_classes``,
  ``dataset``, the training record's ``world_size`` and ``epochs_done``, ``conversions``);
* the whole header at most 16 MiB and nested at most 64 deep.

Then :func:`check_fits` compares the model the header describes, built on the ``meta``
device (no memory), with the index, so that loading never allocates a model its weights do
not fill. A failed check is one line naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from torch import nn

from leanconv.errors import LeanconvError
from leanconv.layers.spec import layer_types
from leanconv.models.registry import names
from leanconv.util.limits import (MAX_ACTIVATION, MAX_CLASSES, MAX_EPOCHS, MAX_INPUT_CHANNELS, MAX_INPUT_VALUES,
                                  MAX_SIDE, MAX_THREADS, MAX_WIDTH)

__all__ = ["read_index", "leanconv_header", "check_header", "check_fits", "not_leanconv", "corrupt", "Invalid",
           "SPEC_ARGS", "MAX_HEADER_BYTES", "MAX_DEPTH", "MAX_ACTIVATION"]

FORMAT = 1
MAX_HEADER_BYTES = 16 * 2**20  # genuine headers are kilobytes; JSON this size parses to ~10x in memory
MAX_DEPTH = 64  # nesting of the header's JSON (a Sequential spec adds two levels)
MAX_EDITS = 100_000
MAX_TEXT = 4096  # a name, a path, a dataset spec
MAX_KERNEL = 1024  # kernel sides, strides, paddings, dilations
# safetensors dtypes -> bytes per element
DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
          "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64")
OPS = ("resize", "replace", "identity")
_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class Invalid(Exception):
    """A header field that breaks the schema: ``field`` and what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")


def not_leanconv(path: str | Path) -> LeanconvError:
    return LeanconvError(f"{str(path)!r} is not a leanconv checkpoint (safetensors with a leanconv header)")


def corrupt(path: str | Path, problem: str) -> LeanconvError:
    return LeanconvError(f"checkpoint {str(path)!r} is corrupt or not a leanconv checkpoint: {problem}")


# ---------------------------------------------------------------- value kinds


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(field, f"must be a whole number in [{low}, {high}], got {_short(value)}")
    return value


def _real(value: Any, field: str, low: float, high: float, *, open_high: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and low <= value and (value < high if open_high else value <= high)
    if not ok:
        raise Invalid(field, f"must be a number in [{low:g}, {high:g}{')' if open_high else ']'}, got {_short(value)}")
    return value


def _text(value: Any, field: str, *, none: bool = False) -> None:
    if value is None and none:
        return
    if not isinstance(value, str) or len(value) > MAX_TEXT or "\0" in value:
        raise Invalid(field, f"must be a text of at most {MAX_TEXT} characters, got {_short(value)}")


def _object(value: Any, field: str, keys: tuple[str, ...] | None = None) -> dict:
    if not isinstance(value, dict):
        raise Invalid(field, f"must be a JSON object, got {_short(value)}")
    unknown = sorted(set(value) - set(keys)) if keys is not None else []
    if unknown:
        raise Invalid(field, f"has unknown key(s) {', '.join(map(repr, unknown[:3]))}")
    return value


def _array(value: Any, field: str, longest: int) -> list:
    if not isinstance(value, list) or len(value) > longest:
        raise Invalid(field, f"must be a list of at most {longest} items, got {_short(value)}")
    return value


def _sides(low: int, high: int, *, none: bool = False, names: tuple[str, ...] = ()) -> Callable[[Any, str], None]:
    """An int, or a list of one or two ints (or None where ``none``), in [low, high]; or one of ``names``."""
    def check(value: Any, field: str) -> None:
        if (value is None and none) or (isinstance(value, str) and value in names):
            return
        items = value if isinstance(value, list) and 1 <= len(value) <= 2 else [value]
        for item in items:
            if not (item is None and none):
                _whole(item, field, low, high)
    return check


def _flag(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise Invalid(field, f"must be true or false, got {_short(value)}")


def _one_of(*choices: str) -> Callable[[Any, str], None]:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, str) or value not in choices:
            raise Invalid(field, f"must be one of {', '.join(choices)}, got {_short(value)}")
    return check


def _order(value: Any, field: str) -> None:
    if value is not None:
        for i, item in enumerate(_array(value, field, 2 * MAX_WIDTH)):
            _whole(item, f"{field}[{i}]", 0, 2 * MAX_WIDTH)


def _width(value: Any, field: str) -> None:
    _whole(value, field, 1, MAX_WIDTH)


# Every argument a layer spec may carry (every registered type's spec_kwargs) -> its check.
SPEC_ARGS: dict[str, Callable[[Any, str], None]] = {
    **{name: _width for name in ("in_channels", "out_channels", "in_features", "out_features", "num_features",
                                 "kept_channels", "implant_channels", "groups")},
    "kernel_size": _sides(1, MAX_KERNEL), "stride": _sides(1, MAX_KERNEL, none=True),
    "dilation": _sides(1, MAX_KERNEL), "padding": _sides(0, MAX_KERNEL, names=("same", "valid")),
    "output_size": _sides(1, MAX_SIDE, none=True),
    **{name: _flag for name in ("bias", "affine", "track_running_stats", "inplace", "ceil_mode",
                                "count_include_pad")},
    "eps": lambda v, f: _real(v, f, 1e-30, 1.0),
    "momentum": lambda v, f: None if v is None else _real(v, f, 0.0, 1.0),
    "p": lambda v, f: _real(v, f, 0.0, 1.0),
    "overlap": lambda v, f: _real(v, f, 0.0, 1.0, open_high=True),
    "start_dim": lambda v, f: _whole(v, f, -8, 8), "end_dim": lambda v, f: _whole(v, f, -8, 8),
    "padding_mode": _one_of("zeros", "reflect", "replicate", "circular"),
    "pattern": lambda v, f: _text(v, f),
    "impl": _one_of("auto", "kernel", "reference", "grouped", "gather"),  # a new layer's chosen form
    "channel_order": _order,
}


# ---------------------------------------------------------------- the leanconv header


def _depth(value: Any) -> int:
    """How deep ``value`` nests (iteratively: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _spec(spec: Any, field: str) -> None:
    _object(spec, field, ("type", "kwargs", "children"))
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in layer_types():
        raise Invalid(f"{field}.type", f"names no leanconv layer type ({', '.join(layer_types())}), got "
                      f"{_short(kind)}; it was written by a newer leanconv or is corrupt")
    for key, value in _object(spec.get("kwargs", {}), f"{field}.kwargs").items():
        if key not in SPEC_ARGS:
            raise Invalid(f"{field}.kwargs", f"has an argument {_short(key)} no {kind} takes")
        SPEC_ARGS[key](value, f"{field}.kwargs.{key}")
    if kind == "Sequential":
        for i, child in enumerate(_array(spec.get("children", []), f"{field}.children", MAX_EDITS)):
            _spec(child, f"{field}.children[{i}]")
    elif "children" in spec:
        raise Invalid(field, f"is a {kind}, which has no children")


def _edit(edit: Any, field: str) -> None:
    _object(edit, field, ("op", "path", "module"))
    if edit.get("op", "replace") not in OPS:
        raise Invalid(f"{field}.op", f"must be one of {', '.join(OPS)}, got {_short(edit.get('op'))}")
    path = edit.get("path")
    if not isinstance(path, str) or len(path) > MAX_TEXT or (path and not _PATH.fullmatch(path)):
        raise Invalid(f"{field}.path", f"must be a dotted module path such as 'layer1.0.conv1', got {_short(path)}")
    if "module" not in edit:
        raise Invalid(field, "has no module spec")
    _spec(edit["module"], f"{field}.module")


def _plain(value: Any, field: str, depth: int = 0) -> None:
    """A zoo argument beyond the shared three: a plain small value or a short list of them."""
    if isinstance(value, list) and depth < 3:
        for i, item in enumerate(_array(value, field, 256)):
            _plain(item, f"{field}[{i}]", depth + 1)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        _whole(value, field, -MAX_WIDTH, MAX_WIDTH)
    elif isinstance(value, float):
        _real(value, field, -MAX_WIDTH, MAX_WIDTH)
    elif isinstance(value, str):
        _text(value, field)
    else:
        raise Invalid(field, f"must be a number, text or a short list of them, got {_short(value)}")


_ZOO_ARGS = {"num_classes": (1, MAX_CLASSES), "in_channels": (1, MAX_INPUT_CHANNELS), "input_size": (8, MAX_SIDE)}


def _base(base: Any) -> None:
    _object(base, "base", ("zoo", "constructor", "kwargs"))
    if ("zoo" in base) == ("constructor" in base):
        raise Invalid("base", "must name either a zoo model or a constructor")
    kwargs = _object(base.get("kwargs", {}), "base.kwargs")
    for key in kwargs:
        if not key.isidentifier() or len(key) > 100:
            raise Invalid("base.kwargs", f"has a key that is no argument name: {_short(key)}")
    if "constructor" in base:
        _text(base["constructor"], "base.constructor")
        return
    if not isinstance(base["zoo"], str) or base["zoo"] not in names():
        raise Invalid("base.zoo", f"names no zoo model ({', '.join(names())}), got {_short(base['zoo'])}")
    for key, value in kwargs.items():
        if key in _ZOO_ARGS:
            _whole(value, f"base.kwargs.{key}", *_ZOO_ARGS[key])
        else:
            _plain(value, f"base.kwargs.{key}")


def check_input_shape(shape: Any, field: str = "meta.input_shape") -> None:
    """Three whole numbers [C, H, W] within :mod:`leanconv.util.limits` (also used for ``--input-shape``)."""
    ok = isinstance(shape, list) and len(shape) == 3 and all(
        isinstance(s, int) and not isinstance(s, bool) for s in shape)
    if ok:
        c, h, w = shape
        ok = (1 <= c <= MAX_INPUT_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE
              and c * h * w <= MAX_INPUT_VALUES)
    if not ok:
        raise Invalid(field, f"must be three whole numbers [C, H, W] with C in [1, {MAX_INPUT_CHANNELS}], H and W in "
                      f"[1, {MAX_SIDE}] and C*H*W <= {MAX_INPUT_VALUES}, got {_short(shape)}")


def _meta(meta: Any) -> None:
    """The fields of ``model.leanconv_meta`` that leanconv reads back; other records pass as they are."""
    _object(meta, "meta")
    if meta.get("input_shape") is not None:
        check_input_shape(meta["input_shape"])
    if meta.get("num_classes") is not None:
        _whole(meta["num_classes"], "meta.num_classes", 1, MAX_CLASSES)
    if meta.get("dataset") is not None:
        dataset = _object(meta["dataset"], "meta.dataset")
        _text(dataset.get("name"), "meta.dataset.name", none=True)
        _text(dataset.get("data_dir"), "meta.dataset.data_dir", none=True)
    if "train_config" in meta:
        _object(meta["train_config"], "meta.train_config")
    if "world_size" in meta:
        _whole(meta["world_size"], "meta.world_size", 1, 64 * MAX_THREADS)
    if "epochs_done" in meta:
        _whole(meta["epochs_done"], "meta.epochs_done", 0, MAX_EPOCHS)
    for i, entry in enumerate(_array(meta.get("conversions", []), "meta.conversions", MAX_EDITS)):
        _object(entry, f"meta.conversions[{i}]")


def check_header(header: Any) -> dict[str, Any]:
    """The leanconv header with ``edits`` and ``meta`` filled in ([] and {}); raises
    :class:`Invalid` for the first field that breaks the schema."""
    if _depth(header) > MAX_DEPTH:
        raise Invalid("the header", f"nests deeper than {MAX_DEPTH} levels")
    _object(header, "the header")
    if type(header.get("format")) is not int or header["format"] != FORMAT:
        raise Invalid("format", f"must be {FORMAT} (this leanconv's checkpoint format), "
                                f"got {_short(header.get('format'))}")
    _base(header.get("base"))
    for i, edit in enumerate(_array(header.setdefault("edits", []), "edits", MAX_EDITS)):
        _edit(edit, f"edits[{i}]")
    _meta(header.setdefault("meta", {}))
    return header


# ---------------------------------------------------------------- the file: index and header


def read_index(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...]]]]:
    """The safetensors header of the regular file ``path`` and its checked tensor index
    (name -> (dtype, shape)). Reads the header only, never the tensors."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise not_leanconv(path)
        text = fh.read(length)
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError, MemoryError):  # not JSON (or not UTF-8), or nested past Python's stack
        raise not_leanconv(path) from None
    if not isinstance(raw, dict):
        raise not_leanconv(path)
    try:
        return raw, _index(raw, size - 8 - length)
    except Invalid as exc:
        raise corrupt(path, f"its tensor index: {exc}") from None


def _index(raw: dict[str, Any], data_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    index, ranges = {}, []
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        field = _short(name)
        _object(entry, field, ("dtype", "shape", "data_offsets"))
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise Invalid(f"{field}.dtype", f"must be one of {', '.join(DTYPES)}, got {_short(dtype)}")
        for i, side in enumerate(_array(shape, f"{field}.shape", 8)):
            _whole(side, f"{field}.shape[{i}]", 0, data_bytes)
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise Invalid(f"{field}.data_offsets", f"must be [begin, end], got {_short(offsets)}")
        begin, end = (_whole(o, f"{field}.data_offsets", 0, data_bytes) for o in offsets)
        if end < begin:
            raise Invalid(f"{field}.data_offsets", f"must be [begin, end] with begin <= end, got {[begin, end]}")
        if end - begin != math.prod(shape) * DTYPES[dtype]:
            raise Invalid(field, f"takes {end - begin} bytes in the file, not the {math.prod(shape)} elements "
                          f"of {dtype} its shape says")
        index[name] = (dtype, tuple(shape))
        ranges.append((begin, end, field))
    _tiles(ranges, data_bytes)
    return index


def _tiles(ranges: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' byte ranges must follow one another from the start of the data to its end,
    with no gap and no overlap (what safetensors itself requires)."""
    reached = 0
    for begin, end, field in sorted(ranges):
        if begin != reached:
            raise Invalid(f"{field}.data_offsets", f"must start where the previous tensor ends (byte {reached}), "
                          f"got {[begin, end]}")
        reached = end
    if reached != data_bytes:
        raise Invalid("the tensors", f"fill {reached} of the {data_bytes} bytes after the header")


def leanconv_header(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """leanconv's own header from a safetensors header, checked (:func:`check_header`)."""
    metadata = raw.get("__metadata__")
    text = metadata.get("leanconv") if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise not_leanconv(path)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError, MemoryError):
        raise corrupt(path, "its leanconv header is not valid JSON or nests too deep") from None
    if isinstance(header, dict) and header.get("format") != FORMAT and not isinstance(header.get("format"), bool):
        raise LeanconvError(f"{str(path)!r} has an unsupported leanconv checkpoint format "
                            f"{_short(header.get('format'))}; this leanconv reads format {FORMAT}")
    try:
        return check_header(header)
    except Invalid as exc:
        raise corrupt(path, str(exc)) from None


def check_fits(model: nn.Module, index: dict[str, tuple[str, tuple[int, ...]]], path: Path, cause: str) -> None:
    """Refuse a model (built on the meta device) whose state dict differs from the file's
    tensors (``__extra__.`` tensors aside) in a name, a shape or the kind of dtype."""
    own = model.state_dict()
    stored = {k: v for k, v in index.items() if not k.startswith("__extra__.")}
    missing, unexpected = [k for k in own if k not in stored], [k for k in stored if k not in own]
    if missing or unexpected:
        raise LeanconvError(f"checkpoint {str(path)!r} does not fit its own architecture (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}): {cause}")
    for name, tensor in own.items():
        dtype, shape = stored[name]
        if tuple(tensor.shape) != shape or tensor.is_floating_point() != (dtype in FLOAT_DTYPES):
            raise LeanconvError(f"checkpoint {str(path)!r} does not fit its own architecture: {name} is {dtype} "
                                f"{list(shape)} in the file, {str(tensor.dtype).split('.')[-1]} "
                                f"{list(tensor.shape)} in the model its header describes: {cause}")
