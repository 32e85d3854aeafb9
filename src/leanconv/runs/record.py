"""What every run returns: the model it made and one record of how, measured.

A :class:`Record` has the same top-level keys for every kind of run (``record.json``):

* ``kind`` (the subcommand: ``prune``, ``prune3d``, ``convert``, ``sensitivity``),
  ``config`` (the resolved settings), ``command`` (the command that reproduces the run;
  null for a model given in memory), ``source`` and ``input_shape``;
* ``before`` and ``after``: measurements of the model the run started from and of the
  result (:func:`measure`: counted ``params``, ``macs`` and ``flops`` of one image, test
  accuracy and loss, and latency in milliseconds per batch; counted costs only when the
  caller measures itself);
* ``timing``: where latency was measured, the two models timed *side by side* in interleaved
  rounds (:func:`time_pair`, :mod:`leanconv.cost.side_by_side`) on the run's runtime, at batch
  1 and 64 (and the run's batch), with runtime, version, threads and CPU; ``before`` and
  ``after`` then hold each model's ``latency_ms`` from that same timing;
* derived from them: ``achieved`` (kept share of MACs and params), ``mac_reduction`` and,
  where latency was measured, ``speedup_batch1`` and ``speedup_batch64`` (the median over
  rounds of the unpruned over the result's time; the spread is in ``timing``), and
  ``runtime``;
* ``seconds``, and the keys that kind of run adds (``details``, flattened into the top level:
  the channel plan of a prune, the samples and predictor of a 3-D prune, ...).

Units: MACs are multiply-accumulates for one image (FLOPs = 2 x MACs, the same ratios);
accuracy is top-1 in percent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from leanconv import checkpoint
from leanconv.cost import count
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.train import evaluate
from leanconv.util.files import write_json
from leanconv.util.fileset import write_together

__all__ = ["Record", "Result", "measure", "counted", "one_shot", "time_pair", "add_latency", "LATENCY_BATCHES",
           "RECORD_FILES"]

LATENCY_BATCHES = ("batch1", "batch64")
RECORD_FILES = {"convert": "convert.json", "sensitivity": "sensitivity.json"}  # other kinds: record.json


def counted(model: nn.Module, shape) -> dict[str, Any]:
    """Counted params, MACs and FLOPs of one image."""
    cost = count(model, shape)
    return {"params": cost.params, "macs": cost.macs, "flops": cost.flops}


def measure(model: nn.Module, shape, test_loader) -> dict[str, Any]:
    """Counted cost, test accuracy and loss (latency comes from :func:`time_pair`, side by side)."""
    metrics = evaluate(model, test_loader)
    return {**counted(model, shape), "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]}


def one_shot(model: nn.Module, shape, test_loader, data, resolution: int | None, batch_size: int) -> dict[str, Any]:
    """Judge a changed model right away: re-estimate its BatchNorm statistics on training
    images (no fine-tuning; what fine-tuning then starts from) and measure counted cost and
    test accuracy; ``test_accuracy_stale_bn`` is the accuracy before that, with the statistics
    the unchanged model left."""
    from leanconv.train.finetune import recalibrate_on_training_data

    stale = evaluate(model, test_loader)["accuracy"]
    recalibrate_on_training_data(model, data, resolution, batch_size)
    return {**counted(model, shape), "test_accuracy": evaluate(model, test_loader)["accuracy"],
            "test_accuracy_stale_bn": stale, "bn": "re-estimated on training images"}


def time_pair(before: nn.Module, after: nn.Module, shapes: tuple, *, runtime: str, threads: int, repeats: int,
              batches: tuple[int, ...] = (1, 64)) -> dict[str, Any]:
    """``before`` and ``after`` (input shapes ``shapes``) timed side by side on ``runtime`` at
    each batch size: ``{"runtime", "version", "threads", "cpu", "rounds", "repeats",
    "batch<B>": {"latency_ms", "ratio", "speedup"} ...}``, the ratios as
    :class:`~leanconv.cost.side_by_side.SideBySide` gives them (after over before)."""
    out: dict[str, Any] = {}
    for batch in dict.fromkeys(batches):
        sbs = time_side_by_side({"before": before, "after": after}, {"before": shapes[0], "after": shapes[1]},
                                runtime=runtime, threads=threads, batch=batch, rounds=7, repeats=repeats, warmup=3)
        out.update({"runtime": sbs.runtime, "version": sbs.version, "threads": sbs.threads, "cpu": sbs.cpu,
                    "rounds": sbs.rounds, "repeats": sbs.repeats})
        out[f"batch{batch}"] = {"latency_ms": sbs.latency_ms, "ratio": sbs.ratio["after"],
                                "speedup": sbs.speedup["after"]}
    return out


def add_latency(before: dict[str, Any], after: dict[str, Any], timing: dict[str, Any]) -> None:
    """Each model's latency (ms per batch, from the side-by-side ``timing``) into its measurement."""
    for key, side in (("before", before), ("after", after)):
        side["latency_ms"] = {b: t["latency_ms"][key] for b, t in timing.items() if b.startswith("batch")}


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
    timing: dict[str, Any] | None = None  # time_pair's side-by-side timing, where latency was measured

    def derived(self) -> dict[str, Any]:
        """``achieved``, ``mac_reduction`` and the speedups, from ``before``, ``after`` and ``timing``."""
        b, a = self.before, self.after
        if not b or not a or "macs" not in b or "macs" not in a:
            return {}
        out: dict[str, Any] = {"achieved": {"macs": a["macs"] / b["macs"], "params": a["params"] / b["params"]},
                               "mac_reduction": b["macs"] / a["macs"]}
        timing = self.timing or {}
        for batch in LATENCY_BATCHES:
            out[f"speedup_{batch}"] = timing[batch]["speedup"]["median"] if batch in timing else None
        if timing:
            out["runtime"] = f"{timing['runtime']} {timing['version']}, {timing['threads']} thread(s), {timing['cpu']}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "command": self.command, "source": self.source,
                "input_shape": self.input_shape, "before": self.before, "after": self.after, **self.derived(),
                "timing": self.timing, "seconds": self.seconds, **self.details}


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
