"""Prune channels until the model's *predicted latency on a runtime* meets a budget.

``prune_to_latency(model, scores, x, target=0.5, latency=LatencyModel(...))`` keeps the most
important channels that fit in ``target`` times the unpruned model's latency, predicted by a
measured :class:`~leanconv.cost.latency_table.LatencyModel` (one runtime, thread count, batch
size). How it decides:

1. **Only counts on the staircase.** A CPU conv computes in blocks of channels (ONNX Runtime
   and oneDNN: the float32 vector width, 16 with AVX-512), so its time is flat within a block:
   a count that is not a block's top costs as much as the top and keeps less. Each group may
   keep its full size or a multiple of ``step`` (default: :func:`~leanconv.cost.simd_channels`,
   rounded up to whole units), and below one block a multiple of a quarter block (a narrow
   input can take a cheaper path), never below the floor; a move is only taken when the table
   says it saves time, so the solver never picks a count that costs as much as a larger one.
2. **Greedy knapsack with exact coupling.** Start from the full model; at each step, for
   every group, price its next lower count: the criterion's importance of the units it would
   drop (lowest first) over the latency it saves, both computed exactly on the table with the
   other groups at their current counts (a conv's time depends on its input group and its
   output group together). Take the cheapest move; repeat until the prediction meets the
   target. HALP (Shen et al., NeurIPS 2022) solves the same knapsack with a dynamic programme
   that prices each group with its neighbours fixed at their full widths; the greedy instead
   re-prices with the neighbours as they are, which is what the coupled staircase needs, and
   takes milliseconds (one table lookup per touched layer).
3. **Reachability first.** Every group at its lowest count gives the fastest model the rules
   allow; a target below its prediction raises :class:`~leanconv.errors.LeanconvError` before
   any scoring (:func:`check_latency_reachable`).

The caller (:func:`leanconv.runs.prune.run_prune`) then measures the realised model against the
unpruned one side by side and, if it misses the target, tightens and solves again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from leanconv.cost import count, simd_channels
from leanconv.cost.latency_table import CALL, LatencyModel, LayerConfig, layer_configs
from leanconv.errors import LeanconvError, UnreachableLatency
from leanconv.graph.groups import TracedGroup, trace_groups
from leanconv.layers.implant import ImplantConv2d
from leanconv.util import checks
from leanconv.util.model_io import to_model
from leanconv.util.progress import Progress
from leanconv.width.budget import Importance, PruneResult
from leanconv.width.planner import Planner, checked_scores, cut_copy, layer_changes, normalized
from leanconv.width.candidates import check_candidates, choose, group_factors
from leanconv.width.damage import COUNTS as DAMAGE_COUNTS
from leanconv.width.damage import check_counts, measured_damage

__all__ = ["prune_to_latency", "LatencyPruner", "LatencyPlan", "check_latency_reachable", "measured_damage",
           "solver_configs", "adopt", "half_width", "PRICES"]

PRICES = ("damage", "importance")
MAX_COMBINATIONS = 1024  # channel-count combinations of one layer measured up front


@dataclass
class LatencyPlan:
    """Kept channels per group and the table's (scaled) prediction, in ms per batch."""

    kept: list[int]
    predicted_ms: float


class _Solver:
    """The staircase and the coupled table lookups of one model (module docstring)."""

    def __init__(self, model: nn.Module, traced: Sequence[TracedGroup], shape: tuple[int, ...],
                 latency: LatencyModel, *, floor: float, step: int | None) -> None:
        self.traced, self.latency = list(traced), latency
        self.base = layer_configs(model, shape)
        step = step or (latency.step if latency is not None else simd_channels())  # the table's CPU's block
        self.options: list[list[int]] = []  # allowed kept counts per group, descending
        for t in self.traced:
            size, unit = t.group.size, t.group.size // len(t.units)
            lowest = max(unit, math.ceil((int(floor) if floor >= 1 else math.ceil(floor * size)) / unit) * unit)
            block = step * unit // math.gcd(step, unit)
            fine = max(unit, block // 4)  # below one block a runtime may take a narrower path: quarter steps
            below = sorted({*range(block, size, block), *range(fine, min(block, size), fine)})
            below = [k for k in below if k >= lowest]
            self.options.append([size] + sorted(below, reverse=True))
        # per group: (layer, "in"/"out", channels lost per group channel)
        self.touches: list[list[tuple[str, str, float]]] = []
        for t in self.traced:
            rows = []
            for share in t.shares:
                if share.module in self.base:
                    rows.append((share.module, share.kind, sum(share.counts) / len(share.counts)))
            self.touches.append(rows)
        self.layers_of = [sorted({name for name, _, _ in rows}) for rows in self.touches]

    def configs(self, kept: Sequence[int], names: Sequence[str] | None = None) -> dict[str, LayerConfig]:
        """Layer configurations with each group keeping ``kept[g]`` channels (``names``: only those layers)."""
        wanted = set(self.base) if names is None else set(names)
        d_in = dict.fromkeys(wanted, 0.0)
        d_out = dict.fromkeys(wanted, 0.0)
        for g, rows in enumerate(self.touches):
            lost = self.traced[g].group.size - kept[g]
            if not lost:
                continue
            for name, kind, per in rows:
                if name in wanted:
                    (d_in if kind == "in" else d_out)[name] += lost * per
        out = {}
        for name in wanted:
            c = self.base[name]
            cout = c.cout - round(d_out[name])
            depthwise = c.kind == "conv" and 1 < c.groups == c.cin == c.cout
            cin = cout if depthwise else c.cin - round(d_in[name])
            out[name] = replace(c, cin=cin, cout=cout, groups=cout if depthwise else c.groups)
        return out

    def lowest(self) -> list[int]:
        return [opts[-1] for opts in self.options]

    def layer_ms(self, configs: dict[str, LayerConfig]) -> float:
        self.latency.table.ensure(configs.values())
        return float(sum(self.latency.layer_ms(c) for c in configs.values()))

    def predict(self, kept: Sequence[int]) -> float:
        return self.latency.predict_configs(self.configs(kept))

    def all_configs(self) -> list[LayerConfig]:
        """Every configuration the solver can visit (for measuring them in one go); a layer with
        more than MAX_COMBINATIONS combinations of its groups' counts gives only its own."""
        found = set()
        for name in self.base:
            ins = [(g, per) for g, rows in enumerate(self.touches) for n, k, per in rows if n == name and k == "in"]
            outs = [(g, per) for g, rows in enumerate(self.touches) for n, k, per in rows if n == name and k == "out"]
            groups = sorted({g for g, _ in ins + outs})
            combos = math.prod(len(self.options[g]) for g in groups) if groups else 1
            if combos > MAX_COMBINATIONS:
                groups = []  # measured on demand when the solver visits them
            for choice in _product([self.options[g] for g in groups]):
                kept = [opts[0] for opts in self.options]
                for g, k in zip(groups, choice):
                    kept[g] = k
                found.add(self.configs(kept, [name])[name])
        return sorted(found)

    def solve(self, goal_ms: float, price: Callable[[int, int, int], float]) -> LatencyPlan:
        """Greedy moves down the staircase until the prediction is at most ``goal_ms``;
        ``price(g, kept, lower)`` is what moving group ``g`` from ``kept`` to ``lower`` channels loses."""
        kept = [opts[0] for opts in self.options]
        position = [0] * len(self.options)
        current = {name: c for name, c in self.configs(kept).items()}
        total = self.latency.predict_configs(current)
        while total > goal_ms:
            best = None
            for g, opts in enumerate(self.options):
                names = self.layers_of[g]
                before = sum(self.latency.layer_ms(current[n]) for n in names)
                for j in range(position[g] + 1, len(opts)):  # the nearest lower count that saves time
                    trial = list(kept)
                    trial[g] = opts[j]
                    changed = self.configs(trial, names)
                    saved = before - self.layer_ms(changed)
                    if saved > 1e-9:
                        cost = max(price(g, kept[g], opts[j]), 0.0) / saved
                        if best is None or cost < best[0]:
                            best = (cost, g, j, changed, saved)
                        break
            if best is None:
                break
            _, g, j, changed, saved = best
            kept[g], position[g] = self.options[g][j], j
            current.update(changed)
            total -= saved
        while True:  # the last move may overshoot: give back the moves that still fit, most valuable first
            best = None
            for g, opts in enumerate(self.options):
                up = self._up(g, kept, position, current)
                if up is not None and total + up[1] <= goal_ms:
                    j, added, changed = up
                    value = max(price(g, opts[j], kept[g]), 0.0) / max(added, 1e-9)
                    if best is None or value > best[0]:
                        best = (value, g, j, changed, added)
            if best is None:
                return LatencyPlan(kept, total)
            _, g, j, changed, added = best
            kept[g], position[g] = self.options[g][j], j
            current.update(changed)
            total += added

    def _up(self, g: int, kept: list[int], position: list[int], current: dict[str, LayerConfig]):
        """Group ``g``'s move back up: the largest count that costs what the nearest larger one
        costs (a count is never kept where a larger one is as fast), with the time it adds."""
        if position[g] == 0:
            return None
        names = self.layers_of[g]
        before = sum(self.latency.layer_ms(current[n]) for n in names)
        found = None
        for j in range(position[g] - 1, -1, -1):
            trial = list(kept)
            trial[g] = self.options[g][j]
            changed = self.configs(trial, names)
            added = self.layer_ms(changed) - before
            if found is not None and added > found[1] + 1e-9:
                break
            found = (j, added, changed)
        return found


def _product(lists: list[list[int]]):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _product(lists[1:]):
            yield (head, *rest)


def _prepare(model, example_input, input_shape, latency, floor, step, ignored, strict):
    shape = tuple(input_shape) if input_shape is not None else tuple(example_input.shape[1:])
    if any(isinstance(m, ImplantConv2d) for m in model.modules()):
        raise LeanconvError("a latency budget does not prune models with Neural Implant layers; prune to a MAC "
                            "budget (--target-flops) for implants")
    traced = trace_groups(model, to_model(example_input, model), ignored=ignored, strict=strict)
    if not traced:
        raise LeanconvError("the model has no prunable channels (every layer is an output or excluded)")
    return traced, shape, _Solver(model, traced, shape, latency, floor=floor, step=step)


def _check(target: float, floor: float, step: int | None) -> None:
    checks.fraction(target, "target", of="unpruned model's measured latency")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < math.inf:
        raise LeanconvError(f"floor must be a channel count >= 1 or a fraction in (0, 1), got {floor!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise LeanconvError(f"step must be a positive whole number of channels, got {step!r}")


def solver_configs(model: nn.Module, example_input: Tensor, *, input_shape: Sequence[int] | None = None,
                   floor: float = 1, step: int | None = None, ignored: Sequence[str] = (),
                   strict: bool = True) -> list[LayerConfig]:
    """Every layer configuration a latency budget on ``model`` may need from a table: the
    model's own, each one the solver can choose, and the runtime's call cost (what
    ``leanconv latency-table`` measures, e.g. on the deployment device)."""
    _check(0.5, floor, step)
    _, shape, solver = _prepare(model, example_input, input_shape, None, floor, step, ignored, strict)
    return sorted({CALL, *solver.base.values(), *solver.all_configs()})


def half_width(model: nn.Module, example_input: Tensor, *, input_shape: Sequence[int] | None = None,
               step: int | None = None, strict: bool = True) -> nn.Module:
    """A copy of ``model`` with every prunable group at the staircase count nearest half its
    width (which channels go does not matter: it is timed, not run for accuracy); the second
    reference a latency model of eager PyTorch is fitted on
    (:meth:`~leanconv.cost.latency_table.LatencyModel.calibrate`)."""
    example = to_model(example_input, model)
    traced, shape, solver = _prepare(model, example, input_shape, None, 1, step or simd_channels(), (), strict)
    planner = Planner(model, traced, floor=1, round_to=None, implant=0.0)
    planner.rank([torch.zeros(t.group.size) for t in traced])
    drop = []
    for t, options in zip(traced, solver.options):
        kept = min(options, key=lambda k: (abs(k - t.group.size / 2), -k))
        drop.append((t.group.size - kept) // (t.group.size // len(t.units)))
    return cut_copy(model, traced, planner.plan(drop), example, shape)[0]


def check_latency_reachable(model: nn.Module, example_input: Tensor, *, target: float, latency: LatencyModel,
                            input_shape: Sequence[int] | None = None, floor: float = 1, step: int | None = None,
                            ignored: Sequence[str] = (), strict: bool = True,
                            progress: Callable[[int, int], None] | None = None) -> float:
    """Raise :class:`LeanconvError` when every group at its lowest staircase count is still
    predicted slower than ``target`` times the unpruned latency; else return that fastest
    predicted ratio. Measures the configurations the solver will need (``progress``)."""
    _check(target, floor, step)
    _, _, solver = _prepare(model, example_input, input_shape, latency, floor, step, ignored, strict)
    solver.latency.table.ensure(solver.all_configs(), progress)
    fastest = solver.predict(solver.lowest()) / latency.reference_ms
    _refuse_unreachable(target, fastest, latency)
    return fastest


def _refuse_unreachable(target: float, fastest: float, latency: LatencyModel) -> None:
    if fastest > target:
        raise UnreachableLatency(f"latency target {target:g} is unreachable on {latency.table.runtime}: with every "
                                 "layer at its fewest channels on the runtime's staircase the model is predicted at "
                                 f"{fastest:.3f} of the unpruned latency; raise the target, or cut blocks and input "
                                 "resolution as well (leanconv prune3d --target-latency)")


class LatencyPruner:
    """One model, scored once, solved for any number of latency goals (what a run that
    measures each result and tightens the goal needs): :meth:`solve` then :meth:`realise`.

    ``importance`` is a criterion or precomputed scores (as in
    :func:`~leanconv.width.budget.prune_to_budget`); it decides which channels a group drops.
    ``price`` decides how many each group drops: ``damage`` (default when ``data`` holds
    validation batches) prices a cut by its measured loss increase (:func:`measured_damage`:
    at most ``counts`` cuts per group measured, the others interpolated; None measures every
    one), ``importance`` by the criterion's scores of the dropped units.

    ``candidates`` (with validation data): the allocation is then chosen by measured quality,
    as EagleEye (Li et al., ECCV 2020) does: besides the greedy plan, ``candidates - 1`` plans
    are solved with each group's prices scaled by a random factor (log-normal, sigma 0.5,
    seeded), and the plan whose pruned model has the lowest validation loss right after the cut
    (BatchNorm re-estimated on the same batches) wins (:mod:`.candidates`)."""

    def __init__(self, model: nn.Module, importance: Importance | Sequence[Tensor], example_input: Tensor, *,
                 latency: LatencyModel, input_shape: Sequence[int] | None = None, data=None, floor: float = 1,
                 step: int | None = None, normalize: str = "mean", price: str | None = None,
                 candidates: int = 1, seed: int = 0, ignored: Sequence[str] = (), strict: bool = True,
                 progress: Progress | None = None, target: float | None = None,
                 counts: int | None = DAMAGE_COUNTS) -> None:
        _check(0.5, floor, step)
        if normalize not in ("mean", "none"):
            raise LeanconvError(f"normalize must be 'mean' or 'none', got {normalize!r}")
        has_data = data is not None and bool(getattr(data, "batches", None))
        self.price = price or ("damage" if has_data else "importance")
        if self.price not in PRICES:
            raise LeanconvError(f"price must be one of {', '.join(PRICES)}, got {self.price!r}")
        if self.price == "damage" and not has_data:
            raise LeanconvError("price 'damage' measures each cut on validation batches: pass data=ScoringData(...)")
        check_candidates(candidates, seed, has_data)
        check_counts(counts)
        self.candidates, self.seed, self.data = candidates, seed, data
        self.report = report = progress or (lambda done, total, info: None)
        self.model, self.latency = model, latency
        self.example = to_model(example_input, model)
        self.traced, self.shape, self.solver = _prepare(model, self.example, input_shape, latency, floor, step,
                                                        ignored, strict)
        latency.table.ensure(self.solver.all_configs())
        self.fastest = self.solver.predict(self.solver.lowest()) / latency.reference_ms
        if target is not None:  # refused before any scoring
            checks.fraction(target, "target", of="unpruned model's measured latency")
            _refuse_unreachable(target, self.fastest, latency)
        report(1, 3, {"stage": "groups", "groups": len(self.traced)})
        scores = normalized(checked_scores(importance, model, [t.group for t in self.traced], data), normalize)
        self.planner = Planner(model, self.traced, floor=1, round_to=None, implant=0.0)
        self.planner.rank(scores)
        traced = self.traced
        if self.price == "damage":
            damage = measured_damage(model, traced, self.planner, self.solver.options, self.example, data,
                                     progress=lambda i, n: report(i, n, {"stage": "damage"}),
                                     counts=counts)
            full = [t.group.size for t in traced]

            def lost(g: int, kept: int, lower: int) -> float:
                return damage[(g, lower)] - (0.0 if kept == full[g] else damage[(g, kept)])
        else:
            unit_scores = [sorted((float(scores[g][list(u)].sum()) for u in t.units), reverse=True)
                           for g, t in enumerate(traced)]  # kept first: dropping k..n drops the lowest

            def lost(g: int, kept: int, lower: int) -> float:
                unit = traced[g].group.size // len(traced[g].units)
                return sum(unit_scores[g][lower // unit:kept // unit])
        self._lost = lost
        self.chosen: dict | None = None  # what solve() chose among candidates, for the record
        report(3, 3, {"stage": "scores"})

    def solve(self, target: float) -> LatencyPlan:
        """The plan for ``target`` times the unpruned latency (a fraction; raises if unreachable):
        the greedy plan, or the best of the candidates (class docstring)."""
        checks.fraction(target, "target", of="unpruned model's measured latency")
        _refuse_unreachable(target, self.fastest, self.latency)
        goal = target * self.latency.reference_ms
        plan = self.solver.solve(goal, self._lost)
        if self.candidates == 1:
            return plan

        def draw(generator: torch.Generator) -> LatencyPlan:
            factor = group_factors(len(self.traced), generator)
            return self.solver.solve(goal, lambda g, kept, lower: factor[g] * self._lost(g, kept, lower))

        plan, self.chosen = choose(plan, draw, key=lambda p: tuple(p.kept),
                                   realise=lambda p: self.realise(p, target)[0], candidates=self.candidates,
                                   seed=self.seed, data=self.data, progress=self.report)
        return plan

    def realise(self, plan: LatencyPlan, target: float) -> tuple[nn.Module, PruneResult]:
        """A pruned copy of the model for ``plan`` and its result (``achieved``: the predicted ratio)."""
        traced = self.traced
        drop = [(t.group.size - k) // (t.group.size // len(t.units)) for t, k in zip(traced, plan.kept)]
        chosen = self.planner.plan(drop)
        trial, cost = cut_copy(self.model, traced, chosen, self.example, self.shape)
        base = count(self.model, self.shape)
        predicted = self.latency.predict(trial)
        result = PruneResult(kind="latency", target=target, achieved=predicted / self.latency.reference_ms,
                             params_before=base.params, params_after=cost.params, macs_before=base.macs,
                             macs_after=cost.macs, layers=layer_changes(self.model, trial),
                             removed={t.group.root: r for t, r in zip(traced, chosen.removed) if r})
        return trial, result


def prune_to_latency(model: nn.Module, importance: Importance | Sequence[Tensor], example_input: Tensor, *,
                     target: float, latency: LatencyModel, **options) -> PruneResult:
    """Remove channels of ``model`` in place so that its latency predicted by ``latency`` is at
    most ``target`` times the unpruned model's (module docstring); returns a
    :class:`~leanconv.width.budget.PruneResult` of kind ``"latency"`` whose ``achieved`` is the
    predicted ratio. ``options`` are :class:`LatencyPruner`'s. An unreachable target raises
    before any scoring."""
    _check(target, options.get("floor", 1), options.get("step"))
    pruner = LatencyPruner(model, importance, example_input, latency=latency, target=target, **options)
    trial, result = pruner.realise(pruner.solve(target), target)
    adopt(model, trial)
    return result


def adopt(model: nn.Module, trial: nn.Module) -> None:
    """Make ``model`` the pruned copy ``trial`` (:meth:`LatencyPruner.realise`), in place: it takes
    over the copy's top-level layers, so the model object the caller holds stays the same."""
    for name, child in list(trial.named_children()):
        setattr(model, name, child)
