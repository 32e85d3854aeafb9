"""What every run returns: the model it made and one record of how, measured.

A :class:`Record` has the same top-level keys for every kind of run (``record.json``):

* ``kind`` (the subcommand: ``prune``, ``prune3d``, ``convert``, ``sensitivity``),
  ``config`` (the resolved settings), ``command`` (the command that reproduces the run;
  null for a model given in memory), ``source`` and ``input_shape``;
* ``before`` and ``after``: measurements of the model the run started from and of the
  result (:func:`measure`: counted ``params``, ``macs`` and ``flops`` of one image, test
  accuracy and loss, and latency in milliseconds per batch; counted costs only when the
  caller measures itself);
* derived from them: ``achieved`` (kept share of MACs and params), ``mac_reduction`` and,
  where latency was measured, ``speedup_batch1``, ``speedup_batch64`` and
  ``speedup_batch64_bn_folded`` (median time before / after, each model in its faster layout);
* ``seconds``, and the keys that kind of run adds (``details``, flattened into the top level:
  the channel plan of a prune, the samples and predictor of a 3-D prune, ...).

Units: MACs are multiply-accumulates for one image (FLOPs = 2 x MACs, the same ratios);
accuracy is top-1 in percent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from leanconv import checkpoint
from leanconv.cost import count, measure_fastest_layout
from leanconv.train import evaluate
from leanconv.util.files import write_json
from leanconv.util.fileset import write_together

__all__ = ["Record", "Result", "measure", "counted", "LATENCY_BATCHES", "RECORD_FILES"]

LATENCY_BATCHES = ("batch1", "batch64", "batch64_bn_folded")
RECORD_FILES = {"convert": "convert.json", "sensitivity": "sensitivity.json"}  # other kinds: record.json


def counted(model: nn.Module, shape) -> dict[str, Any]:
    """Counted params, MACs and FLOPs of one image."""
    cost = count(model, shape)
    return {"params": cost.params, "macs": cost.macs, "flops": cost.flops}


def measure(model: nn.Module, shape, test_loader, repeats: int, *, latency: bool = True) -> dict[str, Any]:
    """Counted cost, test accuracy and loss, and (with ``latency``) the measured latency at batch
    1 and 64 (each in the model's faster memory layout) and at batch 64 in the deployment form
    (BatchNorm folded into its conv, :mod:`leanconv.deploy.fold`)."""
    metrics = evaluate(model, test_loader)
    out = {**counted(model, shape), "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]}
    if latency:
        times = {f"batch{b}": measure_fastest_layout(model, shape, b, repeats=repeats, warmup=3).to_dict()
                 for b in (1, 64)}
        times["batch64_bn_folded"] = measure_fastest_layout(model, shape, 64, repeats=repeats, warmup=3,
                                                            fold_bn=True).to_dict()
        out["latency_ms"] = times
    return out


def _speedup(before: dict, after: dict, batch: str) -> float | None:
    if batch not in before.get("latency_ms", {}) or batch not in after.get("latency_ms", {}):
        return None
    return before["latency_ms"][batch]["median_ms"] / after["latency_ms"][batch]["median_ms"]


@dataclass
class Record:
    """One run, as written to ``record.json`` (module docstring)."""

    kind: str
    config: dict[str, Any]
    command: str | None
    source: str
    input_shape: list[int]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    seconds: float | dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    def derived(self) -> dict[str, Any]:
        """``achieved``, ``mac_reduction`` and the speedups, from ``before`` and ``after``."""
        b, a = self.before, self.after
        if not b or not a or "macs" not in b or "macs" not in a:
            return {}
        out: dict[str, Any] = {"achieved": {"macs": a["macs"] / b["macs"], "params": a["params"] / b["params"]},
                               "mac_reduction": b["macs"] / a["macs"]}
        for batch in LATENCY_BATCHES:
            out[f"speedup_{batch}"] = _speedup(b, a, batch)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "command": self.command, "source": self.source,
                "input_shape": self.input_shape, "before": self.before, "after": self.after, **self.derived(),
                "seconds": self.seconds, **self.details}


@dataclass
class Result:
    """The model a run made (None for a run that only measures) and its :class:`Record`."""

    model: nn.Module | None
    record: Record

    def save(self, out: str | Path, *, extra: dict[str, Callable[[Path], Any]] | None = None,
             constructor: str | None = None) -> Path:
        """Write ``out/model.safetensors`` and the record (``RECORD_FILES``: ``record.json``, or
        ``convert.json`` / ``sensitivity.json``), and ``extra`` files (name -> writer), as one
        set: a failure leaves the previous set. Returns ``out``."""
        writers: dict[str, Callable[[Path], Any]] = {}
        if self.model is not None:
            writers["model.safetensors"] = lambda p: checkpoint.save(self.model, p, constructor=constructor)
        writers[RECORD_FILES.get(self.record.kind, "record.json")] = lambda p: write_json(p, self.record.to_dict())
        write_together(out, {**writers, **(extra or {})})
        return Path(out)
