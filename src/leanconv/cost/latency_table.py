"""A latency table: the measured time of every layer configuration a prune can produce.

The time of a convolution on a CPU runtime is a staircase in its channel counts (it computes
in blocks of channels), not a line in its MACs, so a latency budget needs measured times. A
:class:`LatencyTable` holds, for one runtime, thread count, batch size and CPU, the median
time (ms per batch) of single layers (:class:`LayerConfig`: op kind, channels in and out,
kernel, stride, padding, dilation, groups, input height and width), each timed alone on that
runtime. Entries are measured on demand (:meth:`LatencyTable.ensure`) and kept in a JSON file:

* the cache, ``$XDG_CACHE_HOME/leanconv/latency/`` (default ``~/.cache/...``), one file per
  runtime, version, threads, batch and CPU (:func:`cached_table`): a file that is corrupt or
  made for anything else is ignored and rebuilt, never trusted;
* or a file the user names (``--latency-table FILE``, made by ``leanconv latency-table``,
  possibly on the deployment device): read as is; one made for another runtime, version,
  thread count or batch is refused. A table from another CPU predicts that CPU, and nothing
  missing from it can be measured here.

**Predicting a model** (:class:`LatencyModel`). A layer timed alone pays costs that a whole
graph pays differently, and the prediction corrects for two of them, both measured:

* the runtime's per-call cost (binding the input and output of one call), the table's
  ``call`` entry (a one-weight linear layer): subtracted from every layer, added once;
* the layout conversions around a lone conv: ONNX Runtime (and oneDNN) run a conv whose
  channel counts are multiples of the CPU's block (:func:`~leanconv.cost.simd_channels`) in a
  blocked layout, and a whole graph of such convs converts once, not around every conv. Such
  *blocked* layers are scaled by one factor, fitted so that the unpruned model's prediction
  equals its measured latency; other layers convert around themselves in the graph too and
  count as measured.

So ``predict = call + scale * sum(blocked - call) + sum(other - call)`` on ONNX Runtime and
OpenVINO. Eager PyTorch is different: it calls every layer on its own (each pays its call
cost, as when timed alone), and what the table does not hold (BatchNorm, activations, adds,
pooling) runs as separate calls whose cost is partly fixed and partly proportional to the
values they touch; there ``predict = offset + sum(layer) + element_ms * sum(outputs)``
(``outputs``: the values each conv and linear layer writes per batch). With a second
reference, a model of about half the unpruned model's width timed side by side with it
(:meth:`LatencyModel.calibrate`'s ``thin``), offset and ``element_ms`` are both fitted;
with one, ``element_ms`` is 0 and the offset takes it all. Measured on 16 cuts of the
trained ResNet-20 (PyTorch, 1 thread, batch 64, each timed side by side with the unpruned
model; ``benchmarks/bench_latency_variants.py``): largest error 49.2% with the offset alone,
10.3% with both. ONNX Runtime gains nothing from such a term (fitted the same way it was
worse at batch 1), so it keeps the blocked factor alone. ``bench_latency_variants.py``,
``bench_latency_budget.py`` and ``bench_latency_prediction.py`` report the error on every
model they prune.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanconv.cost.hardware import cpu_name
from leanconv.cost.runtimes import check_runtime, check_threads_batch, prepare, runtime_version
from leanconv.cost.side_by_side import time_prepared
from leanconv.errors import LeanconvError
from leanconv.util.files import write_json
from leanconv.util.modes import eval_mode

__all__ = [
    "CALL", "LatencyModel", "LatencyTable", "LayerConfig", "cache_folder", "cached_table", "layer_configs",
    "table_key",
]

log = logging.getLogger(__name__)

FORMAT = "leanconv-latency-table/1"
MAX_TABLE_BYTES = 64 * 2**20
_TARGET_MS = 25.0  # time one entry's calls for about this long (at least 5, at most 40 calls)


@dataclass(frozen=True, order=True)
class LayerConfig:
    """One layer as a runtime sees it. ``kind`` is ``conv`` (2-D) or ``linear``; for a linear
    layer ``h`` is its rows per image and the spatial fields are 1. :data:`CALL` (kind
    ``call``) is the runtime's cost of one call of the smallest model."""

    kind: str
    cin: int
    cout: int
    kh: int = 1
    kw: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    h: int = 1
    w: int = 1

    def key(self) -> str:
        return _key(self)

    @classmethod
    def from_key(cls, text: str) -> LayerConfig:
        fields = dict(part.split("=", 1) for part in text.split(","))
        return cls(kind=fields.pop("kind"), **{k: int(v) for k, v in fields.items()})

    def module(self) -> tuple[nn.Module, tuple[int, ...]]:
        """A layer with this configuration (bias on, as after BatchNorm folding) and its input shape."""
        if self.kind == "call":
            return nn.Linear(1, 1), (1,)
        if self.kind == "linear":
            shape = (self.cin,) if self.h == 1 else (self.h, self.cin)
            return nn.Linear(self.cin, self.cout), shape
        conv = nn.Conv2d(self.cin, self.cout, (self.kh, self.kw), stride=self.stride, padding=self.padding,
                         dilation=self.dilation, groups=self.groups)
        return conv, (self.cin, self.h, self.w)

    def blocked(self, step: int) -> bool:
        """Whether a runtime computes this layer in its blocked layout (channel counts multiples
        of ``step``; a conv reading the image, under 4 channels, converts its output only)."""
        if self.kind != "conv":
            return False
        return self.cout % step == 0 and (self.cin % step == 0 or self.cin < 4)

    def output_elements(self) -> int:
        """Output values per image (what the element-wise work after this layer scales with)."""
        if self.kind == "linear":
            return self.cout * self.h
        def side(n: int, k: int) -> int:
            return (n + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
        return self.cout * side(self.h, self.kh) * side(self.w, self.kw)


CALL = LayerConfig("call", 1, 1)


@functools.lru_cache(maxsize=1 << 16)
def _key(config: LayerConfig) -> str:
    """A configuration's table key (cached: the latency solver looks up the same few thousand
    configurations many times)."""
    return ",".join(f"{f.name}={getattr(config, f.name)}" for f in fields(config))


def _single(value: Any) -> int:
    return int(value[0]) if isinstance(value, tuple) else int(value)


def _config(module: nn.Module, shape: tuple[int, ...]) -> LayerConfig | None:
    if isinstance(module, nn.Conv2d) and len(shape) == 4 and isinstance(module.padding, tuple):
        if len(set(module.stride)) > 1 or len(set(module.padding)) > 1 or len(set(module.dilation)) > 1:
            return None  # asymmetric: not a configuration the table keys (stays in the remainder)
        return LayerConfig("conv", module.in_channels, module.out_channels, *module.kernel_size,
                           _single(module.stride), _single(module.padding), _single(module.dilation), module.groups,
                           shape[2], shape[3])
    if isinstance(module, nn.Linear):
        rows = math.prod(shape[1:-1]) if len(shape) > 2 else 1
        return LayerConfig("linear", module.in_features, module.out_features, h=rows)
    return None


def layer_configs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, LayerConfig]:
    """The :class:`LayerConfig` of each conv and linear layer ``model`` calls on one input of
    ``input_shape`` (by module path; first call), found by running it once."""
    found: dict[str, LayerConfig] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            if name not in found and args and isinstance(args[0], torch.Tensor):
                config = _config(module, tuple(args[0].shape))
                if config is not None:
                    found[name] = config
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) in (nn.Conv2d, nn.Linear)]
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return found


_MACHINE = ("cpu", "step")  # what a table made on another machine (the deployment device) may differ in


def table_key(runtime: str, threads: int, batch: int) -> dict[str, Any]:
    """What a table's times hold for: it must match exactly for the table to be used."""
    check_runtime(runtime)
    check_threads_batch(threads, batch)
    from leanconv.cost.hardware import simd_channels

    return {"format": FORMAT, "runtime": runtime, "version": runtime_version(runtime), "threads": threads,
            "batch": batch, "cpu": cpu_name(), "step": simd_channels()}


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leanconv" / "latency"


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class LatencyTable:
    """Measured layer times for one ``key`` (:func:`table_key`); see the module docstring."""

    def __init__(self, key: Mapping[str, Any], entries: Mapping[str, float] | None = None,
                 path: Path | None = None) -> None:
        self.key = dict(key)
        self.entries: dict[str, float] = dict(entries or {})
        self.path = path  # where ensure() keeps new entries (the cache), or None
        self.stale = set(self.entries)  # measured in an earlier run: read times `drift` (refresh)
        self.drift = 1.0

    @property
    def runtime(self) -> str:
        return self.key["runtime"]

    @property
    def step(self) -> int:
        """The channel block of the table's CPU (:func:`~leanconv.cost.simd_channels` there)."""
        return int(self.key["step"])

    @property
    def here(self) -> bool:
        """Whether this table's CPU is this machine's (only then can entries be measured)."""
        return self.key.get("cpu") == cpu_name()

    def time_of(self, config: LayerConfig) -> float:
        key = config.key()
        return self.entries[key] * (self.drift if key in self.stale else 1.0)

    def refresh(self, configs: Iterable[LayerConfig]) -> float:
        """Measure again those of ``configs`` that an earlier run measured, and read every other
        entry of earlier runs times the median ratio of new to old (:attr:`drift`): a machine
        whose speed changed since (a busier neighbour, another clock) then predicts on one
        scale, where mixing old and new entries made a cut model's prediction drift by a third
        within an hour. Returns the drift (1 on another CPU, where nothing can be measured)."""
        again = sorted({c for c in configs if c.key() in self.stale})
        if not again or not self.here:
            return self.drift
        ratios = []
        for config in again:
            new = measure_layer(config, self.runtime, self.key["threads"], self.key["batch"])
            ratios.append(new / max(self.entries[config.key()], 1e-9))
            self.entries[config.key()] = new
            self.stale.discard(config.key())
        self.drift = float(np.median(ratios))
        return self.drift

    def missing(self, configs: Iterable[LayerConfig]) -> list[LayerConfig]:
        return sorted({c for c in configs if c.key() not in self.entries})

    def ensure(self, configs: Iterable[LayerConfig], progress: Callable[[int, int], None] | None = None) -> int:
        """Measure every configuration not yet in the table; returns how many were measured.
        The table is saved to its cache file after the measurements (a cache that cannot be
        written is logged, and the new entries are kept for this run only)."""
        todo = self.missing(configs)
        if not todo:
            return 0
        if not self.here:
            raise LeanconvError(f"the latency table for {self.key.get('cpu')} lacks {len(todo)} layer "
                                "configuration(s) and they cannot be measured on this CPU; build the table on that "
                                "machine for this model (leanconv latency-table)")
        for i, config in enumerate(todo, 1):
            self.entries[config.key()] = measure_layer(config, self.runtime, self.key["threads"], self.key["batch"])
            if progress is not None:
                progress(i, len(todo))
        if self.path is not None:
            try:
                self.save(self.path)
            except (OSError, LeanconvError) as exc:  # e.g. a read-only cache, a FIFO in its place
                log.warning("latency table cache %s not saved: %s", self.path, exc)
        return len(todo)

    def predict_layers(self, configs: Mapping[str, LayerConfig]) -> float:
        """Sum of the table's times of ``configs`` (all must be in the table)."""
        return float(sum(self.time_of(c) for c in configs.values()))

    def to_dict(self) -> dict[str, Any]:
        """The table as its file holds it: every entry on the latest scale (older ones times the drift)."""
        entries = {k: v * self.drift if k in self.stale else v for k, v in self.entries.items()}
        return {**self.key, "entries": dict(sorted(entries.items()))}

    def save(self, path: str | Path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path, key: Mapping[str, Any], *, strict: bool = True) -> LatencyTable:
        """The table in ``path``, checked against ``key``. ``strict`` (a file the user named):
        a bad or foreign file raises :class:`LeanconvError`; otherwise (the cache) it gives an
        empty table that will be rebuilt into ``path``. Only the CPU may differ from ``key``
        in a strict load: a table made on the deployment device."""
        path = Path(path)
        try:
            data = json.loads(_read(path))
            entries = _entries(data)
            wanted = {k: v for k, v in key.items() if not (strict and k in _MACHINE)}
            wrong = [k for k, v in wanted.items() if data.get(k) != v]
            if wrong:
                raise ValueError("it was made for " + ", ".join(f"{k} {data.get(k)!r} (not {key[k]!r})"
                                                                for k in wrong))
        except (OSError, ValueError, TypeError, UnicodeError, RecursionError, LeanconvError) as exc:
            if not strict:
                return cls(key, path=path)
            if isinstance(exc, FileNotFoundError):
                raise LeanconvError(f"latency table {path} does not exist; build one with leanconv latency-table") \
                    from None
            raise LeanconvError(f"cannot use latency table {path}: {exc}; build one for this setting with "
                                "leanconv latency-table") from None
        return cls({**key, "cpu": data["cpu"], "step": data["step"]}, entries, path=None if strict else path)


def _read(path: Path) -> str:
    """The file's text: a regular file of at most MAX_TABLE_BYTES (a FIFO or device is never opened)."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("it is not a regular file")
    with path.open("rb") as f:
        raw = f.read(MAX_TABLE_BYTES + 1)
    if len(raw) > MAX_TABLE_BYTES:
        raise ValueError(f"it is larger than {MAX_TABLE_BYTES // 2**20} MiB")
    return raw.decode("utf-8")


def _entries(data: Any) -> dict[str, float]:
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise ValueError(f"it is not a leanconv latency table ({FORMAT})")
    step = data.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 1024:
        raise ValueError("it names no channel block (step) of its CPU")
    if not isinstance(data.get("cpu"), str):
        raise ValueError("it names no CPU")  # noqa: TRY004
    entries = {}
    for k, v in data["entries"].items():
        try:
            config = LayerConfig.from_key(k)
        except (ValueError, TypeError, KeyError) as exc:  # KeyError: no kind=
            raise ValueError(f"entry {k[:60]!r} is not a layer configuration") from exc
        big = sys.float_info.max  # not math.inf: a JSON integer above it cannot become a float
        if config.key() != k or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= big:
            raise ValueError(f"entry {k[:60]!r} is not a positive time")
        entries[k] = float(v)
    return entries


def cached_table(runtime: str, threads: int, batch: int) -> LatencyTable:
    """This machine's table for the setting, from the cache (empty when there is none or it is
    unusable); new entries are saved back to it."""
    key = table_key(runtime, threads, batch)
    path = cache_folder() / f"{runtime}-t{threads}-b{batch}-{_digest(key)}.json"
    if not path.exists():
        return LatencyTable(key, path=path)
    return LatencyTable.load(path, key, strict=False)


def measure_layer(config: LayerConfig, runtime: str, threads: int, batch: int) -> float:
    """Median ms per batch of one layer alone on ``runtime`` (a few warm-up calls, then enough
    timed calls to fill about 25 ms, 5 to 40 of them)."""
    module, shape = config.module()
    torch.manual_seed(0)
    prepared = prepare(module, shape, runtime=runtime, threads=threads, batch=batch)
    first = time_prepared({"x": prepared.call}, threads=threads, rounds=1, repeats=2, warmup=2)["x"]
    repeats = int(min(40, max(5, _TARGET_MS / max(float(first.min()), 1e-3))))
    times = time_prepared({"x": prepared.call}, threads=threads, rounds=1, repeats=repeats, warmup=0)["x"]
    return float(np.median(times))


@dataclass
class LatencyModel:
    """Predicts a model's latency on one runtime from a :class:`LatencyTable`, fitted to the
    measured latency of the unpruned model (module docstring)."""

    table: LatencyTable
    input_shape: tuple[int, ...]
    reference_ms: float  # the unpruned model, measured on the runtime
    scale: float  # the factor of blocked layers (graph runtimes)
    step: int  # the channel block
    offset: float = 0.0  # eager PyTorch: the time of what the table does not hold, fitted on the unpruned model
    element_ms: float = 0.0  # eager PyTorch: ms per value a conv or linear layer writes (the work that follows it)
    thin: tuple[dict[str, LayerConfig], float] | None = None  # the second reference: its layers, measured ratio

    @property
    def eager(self) -> bool:
        """Eager PyTorch calls every layer on its own, so each pays its call cost, and what the
        table does not hold (activations, adds, pooling: mostly per-call costs at small sizes)
        stays as a fixed offset; graph runtimes (ONNX Runtime, OpenVINO) run a model in one call."""
        return self.table.runtime == "torch"

    @classmethod
    def calibrate(cls, table: LatencyTable, model: nn.Module, input_shape: Sequence[int], measured_ms: float, *,
                  step: int | None = None, progress: Callable[[int, int], None] | None = None,
                  thin: tuple[Mapping[str, LayerConfig], float] | None = None) -> LatencyModel:
        """Fit the blocked layers' factor so that ``model`` (unpruned) is predicted at ``measured_ms``;
        ``step`` (default: the table's CPU's channel block) says which layers are blocked. ``thin``:
        the layer configurations of a narrower copy of the model and its latency measured side by
        side, as a ratio to ``model``'s; eager PyTorch then also fits ``element_ms`` (module
        docstring; a fit that gives it no positive value keeps the offset alone)."""
        configs = layer_configs(model, input_shape)
        if not configs:
            raise LeanconvError("the model has no conv or linear layer whose latency a table can hold")
        others = list(thin[0].values()) if thin is not None else []
        table.refresh([CALL, *configs.values(), *others])  # on today's scale: the measurement below is today's
        table.ensure([CALL, *configs.values(), *others], progress)
        fitted = cls(table, tuple(input_shape), float(measured_ms), 1.0, step or table.step,
                     thin=(dict(thin[0]), float(thin[1])) if thin is not None else None)
        if fitted.eager:
            layers, values = fitted._eager_sums(configs)
            if thin is not None:
                thin_layers, thin_values = fitted._eager_sums(thin[0])
                if values > thin_values:
                    rest, thin_rest = measured_ms - layers, thin[1] * measured_ms - thin_layers
                    fitted.element_ms = max(0.0, (rest - thin_rest) / (values - thin_values))
            fitted.offset = measured_ms - layers - fitted.element_ms * values
            return fitted
        blocked = sum(fitted._net(c) for c in configs.values() if c.blocked(fitted.step))
        other = sum(fitted._net(c) for c in configs.values() if not c.blocked(fitted.step))
        if blocked > 0:
            fitted.scale = min(20.0, max(0.05, (measured_ms - fitted.call_ms - other) / blocked))
        return fitted

    def refit(self, model: nn.Module, measured_ms: float) -> None:
        """Fit again, in place, to a new measurement of the unpruned ``model`` (one taken side by
        side with a pruned model is steadier than the first one alone; the thin reference keeps
        its measured ratio)."""
        fitted = type(self).calibrate(self.table, model, self.input_shape, measured_ms, step=self.step,
                                      thin=self.thin)
        self.reference_ms, self.scale, self.offset = fitted.reference_ms, fitted.scale, fitted.offset
        self.element_ms = fitted.element_ms

    def _eager_sums(self, configs: Mapping[str, LayerConfig]) -> tuple[float, float]:
        """The table's times of ``configs`` summed, and the values they write per batch."""
        batch = int(self.table.key["batch"])
        return (float(sum(self.table.time_of(c) for c in configs.values())),
                float(sum(c.output_elements() for c in configs.values())) * batch)

    @property
    def call_ms(self) -> float:
        return self.table.time_of(CALL)

    def _net(self, config: LayerConfig) -> float:
        return max(0.0, self.table.time_of(config) - self.call_ms)

    def layer_ms(self, config: LayerConfig) -> float:
        """One layer's share of a whole model's latency (table entries must be there)."""
        if self.eager:
            values = config.output_elements() * int(self.table.key["batch"])
            return self.table.time_of(config) + self.element_ms * values
        return self._net(config) * (self.scale if config.blocked(self.step) else 1.0)

    def predict_configs(self, configs: Mapping[str, LayerConfig]) -> float:
        self.table.ensure([CALL, *configs.values()])
        fixed = self.offset if self.eager else self.call_ms
        return fixed + float(sum(self.layer_ms(c) for c in configs.values()))

    def predict(self, model: nn.Module, progress: Callable[[int, int], None] | None = None) -> float:
        """Predicted ms per batch of ``model`` (measuring any configuration the table lacks)."""
        configs = layer_configs(model, self.input_shape)
        self.table.ensure(configs.values(), progress)
        return self.predict_configs(configs)
