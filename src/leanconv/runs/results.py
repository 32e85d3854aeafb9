"""The comparison record ``DIR/results.jsonl``: its schema, reading, validation and appending.

The ``compare`` command appends one JSON object per line; ``leanconv report DIR`` rebuilds
every table and figure from this file alone. Blank lines are ignored. Four kinds of record:

``run`` (at most one; written first by ``compare``), what the entries must share to be
comparable; ``compare`` refuses to add to a file whose ``identity`` differs from its own::

    {"kind": "run", "identity": {name: value}, "checkpoint": str, "adopted": bool}

(``adopted`` is true when the record was added to a file written before ``run`` records
existed: the records above it were assumed, not checked, to match.)

``baseline`` (exactly one), the unpruned model::

    {"kind": "baseline", "label": "baseline", "model": str, "dataset": str,
     "input_shape": [C, H, W], "accuracy": float, "params": int, "macs": int,
     "latency_ms": LATENCY, "channels": {layer: int}, "checkpoint": str,
     "command": str, "quick": bool, "threads": int}

``sensitivity`` (at most one), per-layer Hessian sensitivity of the baseline::

    {"kind": "sensitivity", "layers": {layer: float}, "probes": int, "images": int}

``entry`` (any number), one compressed model::

    {"kind": "entry", "key": str, "label": str, "family": "width" | "3d" | "layer",
     "target": float | null, "accuracy": float, "params": int, "macs": int,
     "latency_ms": LATENCY, "channels": {layer: int} | null, "finetune_epochs": int,
     "checkpoint": str, "command": str, "seconds": float, "notes": str}

with ``LATENCY = {"torch": {"batch1": ms, "batch64": ms}, "onnx": {"batch1": ms,
"batch64": ms} | null}``. Units: ``accuracy`` is test accuracy in percent; ``params`` counts
parameters; ``macs`` are multiply-accumulates for one image (FLOPs = 2 x MACs); latencies are
median milliseconds per forward pass of a whole batch; ``target`` is the MACs budget as a
fraction of the baseline's (null only for ``layer`` variants that do not aim at a budget);
``seconds`` is the wall time that produced the entry. ``key`` is unique (e.g. ``"hap@0.5"``);
``label`` names the method in tables and plots (e.g. ``"hap+implant"``, ``"scc g=2 o=0.5"``);
``command`` is the exact command that reproduces the row. Keys not listed are kept and
ignored. A violation raises :class:`~leanconv.errors.LeanconvError` naming the file and line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from leanconv.errors import LeanconvError
from leanconv.util.files import JsonlStore, json_error
from leanconv.util.inputs import input_file, path_kind

__all__ = ["RESULTS_FILE", "FAMILIES", "read_results", "parse_results", "validate_record", "append_result"]

RESULTS_FILE = "results.jsonl"
FAMILIES = ("width", "3d", "layer")
_BATCHES = ("batch1", "batch64")


class _Bad(Exception):
    """A schema violation inside one record; the caller adds the file and line."""


def _number(rec: Mapping, key: str, *, low: float = 0.0, high: float = math.inf, nullable: bool = False) -> None:
    value = rec.get(key)
    if value is None and nullable and key in rec:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{key!r} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise _Bad(f"{key!r} must lie in [{low:g}, {high:g}], got {value!r}")


def _integer(rec: Mapping, key: str, *, low: int = 0) -> None:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{key!r} must be a whole number, got {value!r}")
    if value < low:
        raise _Bad(f"{key!r} must be at least {low}, got {value}")


def _text(rec: Mapping, key: str) -> None:
    if not isinstance(rec.get(key), str):
        raise _Bad(f"{key!r} must be a string, got {rec.get(key)!r}")


def _latency_pair(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise _Bad(f"{where} must be an object {{'batch1': ms, 'batch64': ms}}, got {value!r}")
    for batch in _BATCHES:
        try:
            _number(value, batch)
        except _Bad as exc:
            raise _Bad(f"{where}: {exc}") from None
        if value[batch] <= 0:
            raise _Bad(f"{where}: {batch!r} must be positive milliseconds, got {value[batch]!r}")


def _latency(rec: Mapping) -> None:
    lat = rec.get("latency_ms")
    if not isinstance(lat, dict):
        raise _Bad(f"'latency_ms' must be an object with 'torch' and 'onnx', got {lat!r}")
    _latency_pair(lat.get("torch"), "latency_ms.torch")
    if lat.get("onnx") is not None:
        _latency_pair(lat["onnx"], "latency_ms.onnx")
    elif "onnx" not in lat:
        raise _Bad("'latency_ms' needs an 'onnx' key (null when ONNX Runtime was not measured)")


def _mapping(rec: Mapping, key: str, kind: type, *, nullable: bool = False, signed: bool = False) -> None:
    value = rec.get(key)
    if value is None and nullable and key in rec:
        return
    if not isinstance(value, dict):
        raise _Bad(f"{key!r} must be an object {{layer: {kind.__name__}}}, got {value!r}")
    for name, item in value.items():
        ok = not isinstance(item, bool) and isinstance(item, kind if kind is int else (int, float))
        if not ok or (kind is not int and not math.isfinite(item)) or (item < 0 and not signed):
            raise _Bad(f"{key}[{name!r}] must be a {'finite' if signed else 'non-negative'} {kind.__name__}, "
                       f"got {item!r}")


def _check_baseline(rec: Mapping) -> None:
    for key in ("label", "model", "dataset", "checkpoint", "command"):
        _text(rec, key)
    shape = rec.get("input_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)):
        raise _Bad(f"'input_shape' must be three positive whole numbers [C, H, W], got {shape!r}")
    _number(rec, "accuracy", high=100.0)
    _integer(rec, "params")
    _integer(rec, "macs", low=1)
    _latency(rec)
    _mapping(rec, "channels", int)
    if not isinstance(rec.get("quick"), bool):
        raise _Bad(f"'quick' must be true or false, got {rec.get('quick')!r}")
    _integer(rec, "threads", low=1)


def _check_run(rec: Mapping) -> None:
    if not isinstance(rec.get("identity"), dict) or not rec["identity"]:
        raise _Bad(f"'identity' must be a non-empty object {{name: value}}, got {rec.get('identity')!r}")
    _text(rec, "checkpoint")
    if not isinstance(rec.get("adopted"), bool):
        raise _Bad(f"'adopted' must be true or false, got {rec.get('adopted')!r}")


def _check_sensitivity(rec: Mapping) -> None:
    _mapping(rec, "layers", float, signed=True)  # Hutchinson estimates of a small trace can be < 0
    _integer(rec, "probes", low=1)
    _integer(rec, "images", low=1)


def _check_entry(rec: Mapping) -> None:
    for key in ("key", "label", "checkpoint", "command", "notes"):
        _text(rec, key)
    if not rec["key"] or not rec["label"]:
        raise _Bad("'key' and 'label' must not be empty")
    if rec.get("family") not in FAMILIES:
        raise _Bad(f"'family' must be one of {', '.join(FAMILIES)}, got {rec.get('family')!r}")
    if rec.get("target") is None and rec["family"] != "layer":
        raise _Bad(f"'target' must be a MACs fraction in (0, 1] for family {rec['family']!r} "
                   "(null only for layer variants)")
    _number(rec, "target", high=1.0, nullable=True)
    if rec["target"] is not None and rec["target"] <= 0:
        raise _Bad(f"'target' must be a MACs fraction in (0, 1], got {rec['target']!r}")
    _number(rec, "accuracy", high=100.0)
    _integer(rec, "params")
    _integer(rec, "macs", low=1)
    _latency(rec)
    _mapping(rec, "channels", int, nullable=True)
    _integer(rec, "finetune_epochs")
    _number(rec, "seconds")


_CHECKS = {"baseline": _check_baseline, "sensitivity": _check_sensitivity, "entry": _check_entry, "run": _check_run}


def validate_record(record: Any) -> dict:
    """Check one record against the schema (module docstring); returns it, or raises
    :class:`LeanconvError` with the first violation."""
    try:
        if not isinstance(record, dict):
            raise _Bad(f"a record must be a JSON object, got {type(record).__name__}")
        check = _CHECKS.get(record.get("kind"))
        if check is None:
            raise _Bad(f"'kind' must be one of {', '.join(_CHECKS)}, got {record.get('kind')!r}")
        check(record)
    except _Bad as exc:
        raise LeanconvError(f"invalid result record: {exc}") from None
    return record


def _validated(record: Any, where: str) -> dict:
    try:
        return validate_record(record)
    except LeanconvError as exc:
        detail = str(exc).removeprefix("invalid result record: ")
        raise LeanconvError(f"{where}: {detail}") from None


def _collect(numbered: Iterable[tuple[int, Any]], source: str) -> dict[str, Any]:
    """Validate every ``(line number, record)`` and the file-level rules; the baseline may
    still be missing."""
    found: dict[str, Any] = {"run": None, "baseline": None, "sensitivity": None, "entries": []}
    first_line: dict[str, int] = {}
    keys: dict[str, int] = {}
    for number, raw in numbered:
        where = f"{source} line {number}"
        record = _validated(raw, where)
        kind = record["kind"]
        if kind == "entry":
            if record["key"] in keys:
                raise LeanconvError(f"{where}: entry key {record['key']!r} repeats line {keys[record['key']]}; "
                                    "keys must be unique")
            keys[record["key"]] = number
            found["entries"].append(record)
            continue
        if kind in first_line:
            raise LeanconvError(f"{where}: a second {kind} record (the first is on line {first_line[kind]}); "
                                "keep one")
        first_line[kind] = number
        found[kind] = record
    return found


def _finish(found: dict[str, Any], source: str, require_baseline: bool) -> dict[str, Any]:
    if found["baseline"] is None and require_baseline:
        raise LeanconvError(f"{source} has no baseline record; run the compare command to write one")
    return found


def parse_results(lines: Iterable[str], source: str = RESULTS_FILE, *,
                  require_baseline: bool = True) -> dict[str, Any]:
    """Validate the lines of a results file. Returns ``{"run": record or None, "baseline":
    record, "sensitivity": record or None, "entries": [records in file order]}``; errors name
    ``source`` and the 1-based line number. ``require_baseline=False`` accepts a file that
    has none yet (an interrupted ``compare``); its ``baseline`` is then None."""
    numbered = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            numbered.append((number, json.loads(text)))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise LeanconvError(f"{source} line {number}: not valid JSON ({json_error(exc)})") from None
    return _finish(_collect(numbered, source), source, require_baseline)


def _results_path(path: str | Path) -> Path:
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


def read_results(path: str | Path, *, require_baseline: bool = True) -> dict[str, Any]:
    """Read and validate ``path`` (a results file, or a folder holding ``results.jsonl``);
    see :func:`parse_results` for the returned dict and ``require_baseline``. A last line cut
    short by a crash is skipped with a warning."""
    file = _results_path(path)
    if path_kind(file) == "missing":
        raise LeanconvError(f"{file} does not exist; run the compare command first")
    input_file(file, "results file")
    return _finish(_collect(JsonlStore(file).numbered(strict=True), str(file)), str(file), require_baseline)


def append_result(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Validate ``record`` and append it as one line to ``path`` (a results file or a folder).
    Refuses, writing nothing, a record that would make the file invalid (a second baseline or
    sensitivity record, a repeated key); the baseline may come at any point. Returns the
    file's path."""
    file = _results_path(path)
    record = validate_record(dict(record))
    store = JsonlStore(file)
    numbered = store.numbered(strict=True)
    _collect([*numbered, (numbered[-1][0] + 1 if numbered else 1, record)], str(file))
    store.append([record])
    return file
