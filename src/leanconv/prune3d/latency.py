"""Three-dimensional pruning to a measured latency: what changes when the budget is time.

``leanconv prune3d --target-latency R`` keeps the method's search (samples, predictor,
budgeted optimum) and changes what a point costs and how its width is cut:

* **cost** = the point's model timed side by side with the unpruned one on the runtime
  (:func:`timed_ratio`) when the run's tasks run one at a time (``spec["timed"]``): a whole
  model at a reduced side pays fixed costs that layers timed alone do not show. Otherwise
  (parallel workers, Ray) the latency table's prediction of the point's model at its own
  input side, over the unpruned model's measured latency (:func:`latency_ratio`); the table
  (:class:`~leanconv.cost.latency_table.LatencyModel`) is calibrated once on the unpruned
  model, and every layer configuration a point needs (a narrower conv, a smaller side) is
  measured on demand on the runtime and cached. The width step always uses the table;
* **width** ``w`` keeps ``w^2`` of the *latency* of the model as it is after the depth and
  resolution steps (the MAC run: ``w^2`` of its MACs), cut by the staircase solver of
  :mod:`leanconv.width.latency_budget` with the criterion's importance as prices (cheap
  enough for every sample; it never keeps a channel count that costs as much as a larger
  one). Resolution is set **before** width, so the solver prices the layers at the side they
  will run at and the criterion scores at that side.

The latency of ``(d, w, r)`` is then about ``w^2 (a d r^2 + b r^2 + c) + e d + f`` (blocks,
fixed layers, the runtime's call cost, each block's op overheads, the fixed cost), the terms
:data:`LATENCY_TERMS` fitted to the samples. A smooth fit cannot follow what a runtime does at
particular sides (its kernels and tiles change with the feature maps' sizes: on ONNX Runtime
the trained ResNet-20 measured 0.67 of its latency at side 21 but 0.45 at side 17 and 0.28 at
side 14), so before choosing (when points are timed), the unpruned model is timed once at
every side of the box, side by side (:func:`side_profile`), and the fit is scaled at each side
by the measured over the fitted latency there (:class:`SideCorrected`).
The search box is refused before any work when its smallest point is predicted above the
target (:func:`check_latency_box`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

import torch
from torch import nn

from leanconv.cost.latency_table import LatencyModel, cached_table
from leanconv.cost.runtimes import Prepared, prepare
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.errors import UnreachableLatency
from leanconv.importance import ScoringData, run_criterion
from leanconv.prune3d.blocks import shallowest
from leanconv.prune3d.resolution import set_resolution
from leanconv.width.latency_budget import LatencyPruner, adopt

__all__ = ["LATENCY_TERMS", "origin_latency", "latency_at", "latency_ratio", "timed_ratio", "reference_call",
           "prune_width_latency", "check_latency_box", "width_of", "side_profile", "SideCorrected"]

WIDTH_FULL = 0.999  # a share this close to 1 is no cut
TIMED_ROUNDS, TIMED_REPEATS = 5, 10  # a point timed beside the unpruned model
# removable blocks, fixed layers, the call cost; measured latencies add what shrinks with neither
# width nor side: each block's op overheads and the model's fixed cost
LATENCY_TERMS = ("d*w^2*r^2", "w^2*r^2", "w^2", "d", "1")


def origin_latency(model: nn.Module, shape: tuple[int, ...], spec: dict[str, Any]) -> LatencyModel:
    """The latency model of the unpruned ``model``, calibrated to ``spec["reference_ms"]``
    (measured once by the run, so that every task predicts on the same scale)."""
    table = cached_table(spec["runtime"], int(spec["threads"]), int(spec["batch"]))
    return LatencyModel.calibrate(table, model, shape, float(spec["reference_ms"]))


def latency_at(latency: LatencyModel, model: nn.Module) -> LatencyModel:
    """``latency`` at the input shape ``model`` records (its blocked factor and call cost kept)."""
    return replace(latency, input_shape=tuple(int(s) for s in model.leanconv_meta["input_shape"]))


def latency_ratio(latency: LatencyModel, model: nn.Module) -> float:
    """Predicted latency of ``model`` at its recorded side, over the unpruned model's measured one."""
    return latency_at(latency, model).predict(model) / latency.reference_ms


def timed_ratio(reference: Prepared, shape: tuple[int, ...], model: nn.Module, spec: dict[str, Any]) -> float:
    """``model``'s latency over the unpruned model's (``reference``, prepared on the runtime at
    input ``shape``), the two timed side by side in interleaved rounds on ``spec``'s runtime,
    threads and batch: the median over rounds. What a point costs when its run times points
    (``spec["timed"]``): a whole model at a reduced side pays fixed costs that layers timed
    alone do not show."""
    own = tuple(int(s) for s in model.leanconv_meta["input_shape"])
    sbs = time_side_by_side({"unpruned": reference, "point": model}, {"unpruned": shape, "point": own},
                            runtime=spec["runtime"], threads=int(spec["threads"]), batch=int(spec["batch"]),
                            rounds=TIMED_ROUNDS, repeats=TIMED_REPEATS, warmup=3, warmup_s=0.2)
    return float(sbs.ratio["point"]["median"])


def side_profile(model: nn.Module, shape: tuple[int, ...], sides: Sequence[int],
                 measure: Callable[[dict, dict], Any]) -> dict[int, float]:
    """The unpruned ``model``'s latency at each of ``sides`` over its own at ``shape`` (its
    side), all timed side by side in one run by ``measure(models, shapes)`` (e.g.
    :meth:`~leanconv.runs.latency.LatencyBudget.measure`): the median over rounds per side."""
    full = int(shape[-1])
    models, shapes = {"unpruned": model}, {"unpruned": tuple(shape)}
    for side in sorted(set(int(s) for s in sides) - {full}):
        models[f"side{side}"] = set_resolution(copy.deepcopy(model), side)
        shapes[f"side{side}"] = (int(shape[0]), side, side)
    sbs = measure(models, shapes)
    return {full: 1.0, **{int(name[4:]): float(sbs.ratio[name]["median"]) for name in models if name != "unpruned"}}


class SideCorrected:
    """A fitted latency model ``cost(d, w, r)`` scaled at each input side by the measured over
    the fitted latency of the unpruned model there: ``cost(d, w, r) * profile[s] / cost(1, 1,
    s / side)`` with ``s = round(r * side)`` (factor 1 at a side the profile lacks). Exact for
    the unpruned model at every profiled side; elsewhere it assumes a side's surprise scales
    the whole model alike. Not monotone in ``r``: the solver checks each allowed side."""

    def __init__(self, cost: Callable[[Any, Any, Any], Any], side: int, profile: Mapping[int, float]):
        self.cost, self.side = cost, int(side)
        self.profile = {int(s): float(v) for s, v in profile.items()}
        self.factor = {s: v / float(cost(1.0, 1.0, s / self.side)) for s, v in self.profile.items()}

    def __call__(self, d: Any, w: Any, r: Any) -> Any:
        sides = np.rint(np.asarray(r, dtype=np.float64) * self.side).astype(int)
        factor = np.vectorize(lambda s: self.factor.get(int(s), 1.0), otypes=[np.float64])(sides)
        scaled = np.asarray(self.cost(d, w, r), dtype=np.float64) * factor
        return float(scaled) if scaled.ndim == 0 else scaled

    def to_dict(self) -> dict:
        return {"side_profile": {str(s): v for s, v in sorted(self.profile.items())},
                "side_factor": {str(s): v for s, v in sorted(self.factor.items())}}


def reference_call(model: nn.Module, shape: tuple[int, ...], spec: dict[str, Any]) -> Prepared:
    """The unpruned ``model`` prepared once on ``spec``'s runtime, to time points beside it."""
    return prepare(model, shape, runtime=spec["runtime"], threads=int(spec["threads"]), batch=int(spec["batch"]))


def _pruner(model: nn.Module, latency: LatencyModel, settings: Any, batches: list) -> LatencyPruner:
    here = latency_at(latency, model)
    here = replace(here, reference_ms=here.predict(model))  # shares of the model as it is now
    shape = here.input_shape
    criterion = run_criterion(settings.method, probes=settings.probes, seed=settings.seed, estimator=settings.hessian)
    data = ScoringData(batches, extra={"input_shape": shape})
    return LatencyPruner(model, criterion, torch.zeros(1, *shape), latency=here, input_shape=shape, data=data,
                         normalize=settings.normalize, price="importance")


def prune_width_latency(model: nn.Module, latency: LatencyModel, settings: Any, batches: list,
                        share: float) -> dict[str, list[int]]:
    """Cut channels of ``model`` in place until it keeps ``share`` of its predicted latency (or
    as close as the staircase's fastest plan gets); returns the channels removed (group root ->
    group channels; empty when nothing was cut)."""
    if share >= 1:
        return {}
    model.eval()
    pruner = _pruner(model, latency, settings, batches)
    goal = max(share, pruner.fastest)
    if goal >= WIDTH_FULL:  # no plan on the staircase is faster than the model as it is
        return {}
    trial, result = pruner.realise(pruner.solve(goal), goal)
    adopt(model, trial)
    return result.removed


def check_latency_box(origin: Any, target: float, *, w_min: float, side: int) -> dict:
    """Raise ``UnreachableLatency`` (one line) unless the smallest point of the search box is
    predicted within ``target`` of the unpruned latency: the costliest removable blocks
    bypassed down to the stage floors, the smallest ``side``, and width at ``w_min^2`` of the
    latency or the staircase's fastest plan, whichever keeps more. Returns the box."""
    model = shallowest(origin.model, origin.blocks, origin.min_keep, min_per_stage=origin.settings.min_per_stage)
    if side != origin.side:
        set_resolution(model, side)
    small = latency_ratio(origin.latency, model)
    model.eval()
    fastest = _pruner(model, origin.latency, origin.settings, origin.batches(side)).fastest
    smallest = small * max(w_min ** 2, fastest)
    box = {"d_min": origin.min_keep / len(origin.blocks) if origin.blocks else 1.0, "w_min": w_min,
           "side_min": side, "r_min": side / origin.side, "smallest_latency_ratio": smallest,
           "width_fastest_share": fastest}
    if smallest > target:
        raise UnreachableLatency(
            f"latency target {target:g} is unreachable on {origin.latency.table.runtime}: the smallest model in "
            f"the search box (d={box['d_min']:.3g}, w={w_min:g}, side {side}) is predicted at {smallest:.3f} of the "
            "unpruned latency; raise --target-latency or lower --w-min/--r-min")
    return box


def width_of(before: float, after: float) -> float:
    """The realised ``w``: the square root of the latency share the width step kept."""
    return math.sqrt(max(after, 1e-12) / max(before, 1e-12))
