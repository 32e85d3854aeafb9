"""A disk cache for Hutchinson channel traces (:func:`leanconv.importance.hessian.channel_traces`).

HAP's original code cached traces silently under a fixed name, so a changed model or data
set reused stale numbers. Here an entry is keyed by a SHA-256 over

- the model: its ``repr`` (the layer structure) and every state-dict entry's name, dtype,
  shape and bytes (weights and buffers, e.g. BN running statistics);
- the data: every batch tensor's dtype, shape and bytes, in order;
- the settings: selected weight names, the loss function (name, code and simple
  attributes), seed, min/max probes, ``rel_stderr``, ``probes_per_step``, ``stop_quantile``
  and ``probe_groups``. The HVP ``method`` and ``progress`` are not part of the key: the
  methods give the same estimate up to rounding.

An entry is one JSON file ``hessian-<key>.json`` (no pickle) holding the key, the settings
and :meth:`TraceResult.to_dict`; it is written atomically and a hit is logged at INFO.
A stored result keeps the ``seconds`` of the run that computed it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import types
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.importance.hessian import traces
from leanconv.importance.hessian.traces import TraceResult
from leanconv.util.files import write_text

__all__ = ["cached_channel_traces", "cache_key", "model_fingerprint", "data_fingerprint"]

log = logging.getLogger(__name__)

FORMAT = 1
_NOT_IN_KEY = ("method", "progress")
_PRIMITIVE = (int, float, str, bool, type(None))
_SIGNATURE = inspect.signature(traces.channel_traces)


def _hash_tensor(h: "hashlib._Hash", name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's structure (``repr``) and all state-dict names, shapes and bytes."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        _hash_tensor(h, name, t)
    return h.hexdigest()


def data_fingerprint(batches: Iterable[tuple[Tensor, Tensor]]) -> str:
    """SHA-256 of every batch's ``x`` and ``y`` (dtype, shape, bytes), in order."""
    h = hashlib.sha256()
    for i, (x, y) in enumerate(batches):
        _hash_tensor(h, f"x{i}", x)
        _hash_tensor(h, f"y{i}", y)
    return h.hexdigest()


def _code_digest(code: types.CodeType) -> str:
    """Hash of a code object's bytecode and constants (nested code hashed, not repr'd)."""
    h = hashlib.sha256(code.co_code)
    for c in code.co_consts:
        h.update((_code_digest(c) if isinstance(c, types.CodeType) else repr(c)).encode())
    return h.hexdigest()


def _describe_callable(fn: Any) -> Any:
    """A JSON-able description of a loss function that changes when its behaviour can."""
    if isinstance(fn, functools.partial):
        return {"partial": _describe_callable(fn.func), "args": repr(fn.args), "kw": repr(sorted(fn.keywords.items()))}
    qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    desc: dict[str, Any] = {"name": f"{getattr(fn, '__module__', '?')}:{qualname}"}
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        desc["code"] = _code_digest(code)
        cells = [c.cell_contents for c in (fn.__closure__ or ())]
        desc["closure"] = [repr(v) if isinstance(v, _PRIMITIVE) else type(v).__qualname__ for v in cells]
    else:  # a callable object such as nn.CrossEntropyLoss(label_smoothing=0.1)
        attrs = vars(fn) if hasattr(fn, "__dict__") else {}
        desc["attrs"] = {k: repr(v) for k, v in sorted(attrs.items()) if isinstance(v, _PRIMITIVE)}
    return desc


def _settings(params: Mapping[str, Tensor] | None, model: nn.Module, kw: Mapping[str, Any]) -> dict:
    """The resolved probe settings (defaults filled in) that the key covers."""
    sig = _SIGNATURE
    unknown = set(kw) - set(sig.parameters)
    if unknown:
        raise LeanconvError(f"unknown Hessian trace option(s): {', '.join(sorted(unknown))}")
    settings = {
        p.name: kw.get(p.name, p.default)
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_IN_KEY
    }
    settings["loss_fn"] = _describe_callable(settings["loss_fn"])
    settings["params"] = list(traces.default_params(model) if params is None else params)
    return settings


def cache_key(model: nn.Module, batches: list, params: Mapping[str, Tensor] | None = None, **kw: Any) -> str:
    """The SHA-256 key of a trace computation: model + data + resolved settings."""
    blob = json.dumps(
        {"format": FORMAT, "model": model_fingerprint(model), "data": data_fingerprint(batches),
         "settings": _settings(params, model, kw)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _read(path: Path, key: str) -> TraceResult | None:
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT or record.get("key") != key:
            return None
        return TraceResult.from_dict(record["result"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError, LeanconvError) as exc:
        log.warning("ignoring unreadable Hessian cache entry %s (%s)", path, exc)
        return None


def cached_channel_traces(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    cache_dir: str | os.PathLike,
    params: Mapping[str, Tensor] | None = None,
    **kw: Any,
) -> TraceResult:
    """:func:`~leanconv.importance.hessian.channel_traces` with a disk cache in ``cache_dir``.

    Same arguments as ``channel_traces``. A different model (weights, buffers or structure),
    different data or different probe settings never reuses an entry."""
    batches = list(batches)
    directory = Path(cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeanconvError(f"cannot create the Hessian cache directory {directory}: {exc}") from exc
    key = cache_key(model, batches, params, **kw)
    path = directory / f"hessian-{key}.json"
    if path.exists():
        hit = _read(path, key)
        if hit is not None:
            log.info("using cached Hessian traces %s (%d probes)", path, hit.probes)
            return hit
    result = traces.channel_traces(model, batches, params, **kw)
    record = {"format": FORMAT, "key": key, "settings": _settings(params, model, kw), "result": result.to_dict()}
    write_text(path, json.dumps(record))
    log.info("stored Hessian traces in %s", path)
    return result
