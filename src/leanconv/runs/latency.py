"""A latency budget, end to end: measure, predict, solve, measure again, tighten.

What ``--target-latency R`` runs (``prune``, ``compare``): R is a fraction of the unpruned
model's latency *measured* on the run's runtime (``--runtime``, ``--threads``, ``--batch``).

1. :meth:`LatencyBudget.check` (before any scoring): the unpruned model is timed on the
   runtime, the latency table (this machine's cache, or ``--latency-table FILE``) gets every
   layer configuration the solver may choose, the prediction is fitted to the measurement
   (:class:`~leanconv.cost.latency_table.LatencyModel`), and a target below the fastest model
   the staircase allows is refused in one line.
2. :func:`prune_to_measured_latency`: the model is scored once and solved
   (:class:`~leanconv.width.latency_budget.LatencyPruner`: channel counts priced by their
   measured damage, the best of ``--candidates`` allocations by validation loss right after
   the cut); the result is timed side by side
   with the unpruned model (:mod:`leanconv.cost.side_by_side`). A measured ratio above
   ``R + 0.03`` tightens the goal by ``R / measured`` and solves again; one below ``R - 0.03``
   (the model is faster than it needs to be, so it gave up accuracy for nothing) loosens it
   the same way. Once one goal measured within and another over, the next goal lies halfway
   between them; a solve that returns a model already timed is not timed again (still over
   the target with nothing within: the goal drops below that model's prediction). At most
   :data:`MAX_ATTEMPTS` solves; the kept model is the one of the
   loosest goal that measured within ``R + 0.03`` (``final`` in the record's attempts), every
   attempt is recorded. With a table made on another CPU nothing can be measured here: the
   result is the prediction, and the record says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanconv.cost.latency_table import LatencyModel, LatencyTable, cached_table, layer_configs, table_key
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.errors import LeanconvError
from leanconv.util.inputs import input_file
from leanconv.util.progress import Progress, Stage, quiet
from leanconv.width.budget import PruneResult
from leanconv.width.latency_budget import LatencyPruner, adopt, check_latency_reachable, half_width

__all__ = ["MAX_ATTEMPTS", "SLACK", "LatencyBudget", "describe", "prune_to_measured_latency", "final_attempt"]

MAX_ATTEMPTS = 4
SLACK = 0.03  # a measured ratio up to target + SLACK meets the target
WARMUP_S = 0.5  # each model runs at least this long before it is timed (a runtime's first calls are slow)


@dataclass(frozen=True)
class LatencyBudget:
    """Where a latency target holds: runtime, intra-op threads, batch size, and the table to use
    (None: this machine's cache); ``repeats`` timed calls per round when measuring."""

    runtime: str
    threads: int
    batch: int
    table_path: str | None = None
    repeats: int = 10

    def check_table(self) -> None:
        """Refuse, in one line and before any work, a named table that is missing, not a table,
        or made for another runtime, version, thread count or batch."""
        if self.table_path is not None:
            input_file(self.table_path, "latency table")
            self.table()

    def table(self) -> LatencyTable:
        if self.table_path is None:
            return cached_table(self.runtime, self.threads, self.batch)
        return LatencyTable.load(self.table_path, table_key(self.runtime, self.threads, self.batch), strict=True)

    def measure(self, models: dict[str, nn.Module], shape) -> Any:
        return time_side_by_side(models, shape, runtime=self.runtime, threads=self.threads, batch=self.batch,
                                 rounds=5, repeats=self.repeats, warmup=3, warmup_s=WARMUP_S)

    def check(self, model: nn.Module, example: torch.Tensor, shape, target: float, *, strict: bool = True,
              stage: Stage | None = None) -> LatencyModel:
        """The calibrated latency model of ``model`` (unpruned); raises when ``target`` is unreachable."""
        say = stage or quiet
        table = self.table()
        thin = None  # eager PyTorch's second reference: (its layer configurations, its measured ratio)
        if table.here:
            half = _thin_reference(model, example, shape, table, strict) if table.runtime == "torch" else None
            say(f"timing the unpruned model on {self.runtime} ({self.threads} thread(s), batch {self.batch})"
                + (" side by side with a copy of half its width" if half is not None else ""))
            timed = self.measure({"unpruned": model, **({"thin": half} if half is not None else {})}, shape)
            measured = timed.latency_ms["unpruned"]["median_ms"]
            if half is not None:
                thin = (layer_configs(half, shape), timed.ratio["thin"]["median"])
        else:
            measured = None  # a table from the deployment device: its own sum stands in for the model
        say(f"latency table: {len(table.entries)} entries; measuring what the solver needs")
        if measured is None:
            uncalibrated = LatencyModel(table, tuple(shape), 1.0, 1.0, table.step)
            measured = uncalibrated.predict(model)
        latency = LatencyModel.calibrate(table, model, shape, measured, thin=thin)
        check_latency_reachable(model, example, target=target, latency=latency, input_shape=shape, strict=strict)
        return latency


def _thin_reference(model: nn.Module, example: torch.Tensor, shape, table: LatencyTable,
                    strict: bool) -> nn.Module | None:
    """Eager PyTorch's second reference (:func:`~leanconv.width.latency_budget.half_width`),
    or None for a model with nothing to thin (it is then calibrated on itself alone)."""
    try:
        return half_width(model, example, input_shape=shape, step=table.step, strict=strict)
    except LeanconvError:
        return None


def prune_to_measured_latency(model: nn.Module, criterion, example: torch.Tensor, latency: LatencyModel,
                              budget: LatencyBudget, *, target: float, shape, data=None, normalize: str = "mean",
                              strict: bool = True, candidates: int = 1, seed: int = 0,
                              progress: Progress | None = None,
                              stage: Stage | None = None) -> tuple[list[PruneResult], list[dict[str, Any]]]:
    """Prune ``model`` in place to ``target`` of its measured latency (module docstring).
    Returns the result (one round) and the attempts: ``{"goal", "predicted", "measured"}``
    ratios, ``measured`` with its spread (None where nothing could be measured)."""
    say = stage or quiet
    has_data = data is not None and bool(getattr(data, "batches", None))
    pruner = LatencyPruner(model, criterion, example, latency=latency, input_shape=shape, data=data,
                           normalize=normalize, candidates=candidates if has_data else 1, seed=seed, strict=strict,
                           progress=progress)
    verify = latency.table.here  # a table from another CPU: nothing here says how fast it runs there
    goal, attempts, last, chosen = target, [], None, None
    within_goal = over_goal = None  # the loosest goal measured within, the tightest measured over
    for _ in range(MAX_ATTEMPTS):
        plan = pruner.solve(goal)
        seen = next((a for a in attempts if a["kept"] == plan.kept), None)
        if seen is not None:  # the staircase gives a model already measured: nothing new to time
            if chosen is not None or seen["measured"] is None or seen["measured"]["median"] <= target + SLACK:
                break
            # still over and nothing within yet: aim below that model's own prediction and solve again
            goal = min(goal, seen["predicted"]) * target / seen["measured"]["median"]
            if goal < pruner.fastest:
                break
            continue
        trial, result = pruner.realise(plan, target)
        entry: dict[str, Any] = {"goal": goal, "predicted": result.achieved, "measured": None,
                                 "kept": plan.kept, "price": pruner.price, "candidates": pruner.chosen}
        attempts.append(entry)
        last = (trial, result, entry)
        if not verify:
            break
        sbs = budget.measure({"unpruned": model, "pruned": trial}, shape)
        ratio = sbs.ratio["pruned"]
        entry["measured"] = ratio
        entry["unpruned_ms"] = sbs.latency_ms["unpruned"]["median_ms"]
        latency.refit(model, entry["unpruned_ms"])  # the next solve predicts from this steadier figure
        say(f"goal {goal:.3f}: predicted {result.achieved:.3f}, measured {ratio['median']:.3f} "
            f"({ratio['low']:.3f}-{ratio['high']:.3f}) of the unpruned latency")
        goal = _next_goal(goal, ratio["median"], target, within_goal, over_goal, pruner.fastest)
        if ratio["median"] <= target + SLACK:
            if within_goal is None or entry["goal"] > within_goal:
                within_goal, chosen = entry["goal"], last
        else:
            over_goal = entry["goal"] if over_goal is None else min(over_goal, entry["goal"])
        if goal is None:
            break
    trial, result, entry = chosen or last
    entry["final"] = True
    if verify and chosen is None:
        say(f"warning: the result measures {entry['measured']['median']:.3f} of the unpruned latency, above "
            f"the target {target:g} + {SLACK}; the runtime's timing may be noisy here (see the record's attempts)")
    adopt(model, trial)
    return [result], attempts


def _next_goal(goal: float, measured: float, target: float, within_goal: float | None, over_goal: float | None,
               fastest: float) -> float | None:
    """The goal of the next solve after ``goal`` measured ``measured`` (None: stop). Within
    ``target +- SLACK``: stop. Over: tighter by ``target / measured``, but not past halfway to
    the loosest goal that measured within; under: looser the same way, but not past halfway to
    the tightest goal that measured over. ``within_goal`` and ``over_goal`` are those before
    this measurement."""
    if abs(measured - target) <= SLACK:
        return None
    step = goal * target / measured
    if measured > target:
        if within_goal is not None:
            step = max(step, (goal + within_goal) / 2)
        return step if step >= fastest else None
    if over_goal is not None:
        step = min(step, (goal + over_goal) / 2)  # no further than halfway to a goal that measured over
    elif step >= 1.0:
        step = (goal + 1.0) / 2  # a goal of 1 would keep every channel
    return step if step > goal * 1.001 else None


def final_attempt(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The attempt whose model a latency budget kept (``final``; a record from before loosening
    kept its last)."""
    return next((a for a in attempts if a.get("final")), attempts[-1])


def describe(latency: LatencyModel) -> dict[str, Any]:
    """The latency model as a record states it."""
    key = latency.table.key
    return {"runtime": key["runtime"], "version": key["version"], "threads": key["threads"], "batch": key["batch"],
            "cpu": key["cpu"], "step": latency.step, "reference_ms": latency.reference_ms, "scale": latency.scale,
            **({"offset_ms": latency.offset, "element_ms": latency.element_ms,
                "thin_ratio": latency.thin[1] if latency.thin else None} if latency.eager else {}),
            "table_entries": len(latency.table.entries), "measured_here": latency.table.here}

