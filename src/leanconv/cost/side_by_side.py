"""Speedups measured honestly: the models timed side by side, in interleaved rounds.

Two latencies measured minutes apart say little on a machine that other work shares: a load
that comes and goes lands on one model and not the other. :func:`time_side_by_side` prepares
every model on one runtime (:mod:`leanconv.cost.runtimes`), then runs ``rounds`` rounds; in
each round every model runs ``repeats`` timed calls, in an order that rotates from round to
round. A model's latency is the median of all its calls; a ratio is, per round, the model's
median over the reference's median in that round, reported as the median over rounds with the
lowest and highest round as the spread. Units: milliseconds per batch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import nn

from leanconv.cost.hardware import cpu_name
from leanconv.cost.runtimes import DEFAULT_RUNTIME, Prepared, prepare, runtime_version, torch_threads
from leanconv.errors import LeanconvError
from leanconv.util.timing import time_calls

__all__ = ["SideBySide", "time_prepared", "time_side_by_side"]


@dataclass(frozen=True)
class SideBySide:
    """What :func:`time_side_by_side` measured. ``latency_ms[name]``: median, p10 and p90 over
    all timed calls; ``ratio[name]``: latency over the reference's (``median``, and ``low`` and
    ``high``: the extreme rounds); ``speedup[name]`` = the reference's latency over the model's,
    the same way. The reference's own ratio is 1."""

    reference: str
    runtime: str
    version: str
    threads: int
    batch: int
    cpu: str
    rounds: int
    repeats: int
    latency_ms: dict[str, dict[str, float]]
    ratio: dict[str, dict[str, float]]
    speedup: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def setting(self) -> str:
        """One line naming where the figures hold."""
        return (f"{self.runtime} {self.version}, {self.threads} thread(s), batch {self.batch}, {self.cpu}, "
                f"{self.rounds} interleaved rounds of {self.repeats}")


def _spread(values: np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(values)), "low": float(values.min()), "high": float(values.max())}


def time_prepared(calls: Mapping[str, Any], *, threads: int, rounds: int, repeats: int,
                  warmup: int, warmup_s: float = 0.0) -> dict[str, np.ndarray]:
    """Per name, an array ``[rounds, repeats]`` of milliseconds: the interleaved timing itself.
    Each call first runs ``warmup`` times, and on until ``warmup_s`` seconds have passed."""
    names = list(calls)
    times = {n: np.empty((rounds, repeats)) for n in names}
    with torch_threads(threads):
        for n in names:
            time_calls(calls[n], warmup, 1)
            start = time.perf_counter()
            while time.perf_counter() - start < warmup_s:
                calls[n]()
        for r in range(rounds):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                times[n][r] = time_calls(calls[n], 0, repeats)
    return times


def time_side_by_side(models: Mapping[str, nn.Module], input_shape: Sequence[int] | Mapping[str, Sequence[int]], *,
                      reference: str | None = None,
                      runtime: str = DEFAULT_RUNTIME, threads: int = 1, batch: int = 1, rounds: int = 7,
                      repeats: int = 10, warmup: int = 5, warmup_s: float = 0.0) -> SideBySide:
    """Time every model of ``models`` (name -> model; none is changed) on ``runtime`` side by
    side (module docstring); a value may also be a model already :func:`prepared
    <leanconv.cost.runtimes.prepare>` for this runtime, threads and batch (reused across
    calls). ``input_shape`` is one image's shape, or a shape per name (a model that runs at a
    lower resolution). ``reference`` (default: the first name) is what ratios
    divide by."""
    if not models:
        raise LeanconvError("nothing to time: give at least one model")
    reference = reference if reference is not None else next(iter(models))
    if reference not in models:
        raise LeanconvError(f"reference {reference!r} is not one of the models timed ({', '.join(models)})")
    for label, value in (("rounds", rounds), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LeanconvError(f"{label} must be a whole number of at least 1, got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise LeanconvError(f"warmup must be a whole number of at least 0, got {warmup!r}")
    shapes = input_shape if isinstance(input_shape, Mapping) else dict.fromkeys(models, input_shape)
    if set(shapes) != set(models):
        raise LeanconvError("give an input shape for every model timed")
    prepared = {n: m if isinstance(m, Prepared) else prepare(m, shapes[n], runtime=runtime, threads=threads,
                                                             batch=batch) for n, m in models.items()}
    for n, p in prepared.items():
        if (p.runtime, p.threads, p.batch) != (runtime, threads, batch):
            raise LeanconvError(f"{n} was prepared for {p.runtime}, {p.threads} thread(s), batch {p.batch}; "
                                f"not {runtime}, {threads} thread(s), batch {batch}")
    times = time_prepared({n: p.call for n, p in prepared.items()}, threads=threads, rounds=rounds, repeats=repeats,
                          warmup=warmup, warmup_s=warmup_s)
    per_round = {n: np.median(t, axis=1) for n, t in times.items()}
    latency = {n: {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
                   "p90_ms": float(np.percentile(t, 90))} for n, t in times.items()}
    ratio = {n: _spread(per_round[n] / per_round[reference]) for n in models}
    speedup = {n: _spread(per_round[reference] / per_round[n]) for n in models}
    return SideBySide(reference, runtime, runtime_version(runtime), threads, batch, cpu_name(), rounds, repeats,
                      latency, ratio, speedup)
