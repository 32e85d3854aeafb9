"""What each cut of one channel group costs, measured: the latency solver's prices.

A latency budget (:mod:`leanconv.width.latency_budget`) prices moving group ``g`` down to ``k``
channels by the validation loss the model has after that cut alone, with BatchNorm re-estimated
(EagleEye's adaptive-BN evaluation), minus the unpruned model's loss measured the same way.
Measured naively that is two passes over the validation batches for every allowed count of every
group, which does not scale: 200 cuts and 8 minutes on ResNet-56 (2 cores), 1,191 cuts on
MobileNetV2, whose 960-channel layers allow a count every 8 channels. Two things make it cheap:

1. **At most** ``counts`` **cuts per group are measured** (:func:`priced_counts`): spread evenly
   over the group's allowed counts, the lowest always among them. The damage of a count between
   two measured ones is interpolated linearly in the channels kept (the full width costs 0), so
   the solver still sees every count of the staircase.
2. **Nothing before the cut is computed again.** The model is traced once with ``torch.fx``; a
   cut of group ``g`` changes only the layers of ``g``, so every node before the first of them in
   the graph gives the unpruned model's values. Those values (the *frontier*: the ones that later
   nodes read) are computed once per group, in training mode for the BatchNorm re-estimation and
   in evaluation mode for the loss, and each cut of ``g`` runs only the rest of the graph, on
   copies of them (an in-place op after the cut must not change what the next cut reads). The
   frontier of a group is kept in memory only while its cuts are priced, and only when it fits
   in :data:`FRONTIER_BYTES`; a model ``torch.fx`` cannot trace, or whose traced graph does not
   reproduce its own loss, is evaluated whole, as before. Either way the numbers are the same
   (a test compares them).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from leanconv.errors import LeanconvError
from leanconv.graph.groups import TracedGroup
from leanconv.util.batchnorm import reestimating
from leanconv.util.model_io import to_model
from leanconv.width.candidates import adaptive_bn_loss
from leanconv.width.planner import Planner, apply_plan

__all__ = ["COUNTS", "FRONTIER_BYTES", "check_counts", "measured_damage", "priced_counts", "interpolated"]

log = logging.getLogger(__name__)

COUNTS = 6  # cuts measured per group by default (module docstring, point 1)
FRONTIER_BYTES = 2 << 30  # the most one group's cached frontier may take (both modes, all batches)


def check_counts(counts) -> None:
    """Refuse a count of cuts per group that is not None or a whole number >= 1."""
    if counts is not None and (isinstance(counts, bool) or not isinstance(counts, int) or counts < 1):
        raise LeanconvError(f"counts must be a whole number >= 1 or None (every count), got {counts!r}")


def priced_counts(options: Sequence[int], counts: int | None) -> list[int]:
    """The counts of one group whose cut is measured: ``options`` are its allowed counts,
    largest (the full width) first; at most ``counts`` of the lower ones (None: all), evenly
    spread over them: the lowest always among them, and the highest too when ``counts`` > 1."""
    check_counts(counts)
    lower = list(options[1:])
    if counts is None or len(lower) <= counts:
        return lower
    if counts == 1:
        return lower[-1:]
    picks = {round(i * (len(lower) - 1) / (counts - 1)) for i in range(counts)}  # both ends among them
    return [lower[i] for i in sorted(picks)]


def interpolated(options: Sequence[int], measured: dict[int, float]) -> dict[int, float]:
    """Damage at every lower count of ``options`` from the ``measured`` ones (count -> damage),
    linear in the count between measured neighbours; the full width (``options[0]``) is 0."""
    known = sorted({options[0]: 0.0, **measured}.items())
    out = {}
    for k in options[1:]:
        if k in measured:
            out[k] = measured[k]
            continue
        upper = next((c, d) for c, d in known if c > k)
        lower = next(((c, d) for c, d in reversed(known) if c < k), None)
        if lower is None:  # below the lowest measured count: the lowest is always measured, so never
            out[k] = upper[1]
            continue
        share = (k - lower[0]) / (upper[0] - lower[0])
        out[k] = lower[1] + share * (upper[1] - lower[1])
    return out


def measured_damage(model: nn.Module, traced: Sequence[TracedGroup], planner: Planner, options: list[list[int]],
                    example_input: torch.Tensor, data, progress: Callable[[int, int], None] | None = None, *,
                    counts: int | None = COUNTS) -> dict[tuple[int, int], float]:
    """Per group ``g`` and allowed count ``k`` (``options[g][1:]``): the validation loss after
    cutting only ``g`` to ``k`` channels (its lowest-ranked units) with BatchNorm re-estimated,
    minus the unpruned model's loss measured the same way; at most ``counts`` counts per group are
    measured, the others interpolated (module docstring). ``progress(done, total)`` counts cuts."""
    batches, loss_fn = list(data.batches), data.loss_fn
    base = adaptive_bn_loss(copy.deepcopy(model), batches, loss_fn)
    graph = _Graph.trace(model, batches, loss_fn, base)
    chosen = [priced_counts(opts, counts) for opts in options]
    total, done, damage = sum(map(len, chosen)), 0, {}
    for g, ks in enumerate(chosen):
        frontier = None  # the last group's values go before this one's are computed
        frontier = graph.frontier(_members(traced[g])) if graph is not None and ks else None
        unit, measured = traced[g].group.size // len(traced[g].units), {}
        for k in ks:
            drop = [0] * len(traced)
            drop[g] = (traced[g].group.size - k) // unit
            trial = copy.deepcopy(model)
            apply_plan(trial, traced, planner.plan(drop), example_input)
            loss = frontier.loss(trial) if frontier is not None else None
            if loss is None:
                measured[k] = adaptive_bn_loss(trial, batches, loss_fn) - base
            else:  # against the graph's own unpruned loss: the same computation on both sides
                measured[k] = loss - graph.base
            done += 1
            if progress is not None:
                progress(done, total)
        damage.update({(g, k): v for k, v in interpolated(options[g], measured).items()})
    return damage


def _members(t: TracedGroup) -> set[str]:
    return {m.module for m in t.group.members} | {s.module for s in t.shares}


def _within(target: str, modules: set[str]) -> bool:
    """Whether a graph node's target is one of ``modules``, inside one, or holds one."""
    return any(target == m or target.startswith(m + ".") or m.startswith(target + ".") for m in modules)


class _Graph:
    """The model traced with ``torch.fx``, with its BatchNorm statistics re-estimated on
    ``batches`` (the unpruned model whose evaluation-mode values the frontiers hold), and the
    loss it gives there (``base``)."""

    def __init__(self, traced: fx.GraphModule, batches, loss_fn, base: float) -> None:
        self.model, self.nodes, self.batches, self.loss_fn = traced, list(traced.graph.nodes), batches, loss_fn
        self.index, self.base = {n: i for i, n in enumerate(self.nodes)}, base
        self.called = {n.target for n in self.nodes if n.op == "call_module"}  # layers the graph calls
        self.stateful = {t for t in self.called if any(True for _ in traced.get_submodule(t).buffers())}

    @classmethod
    def trace(cls, model: nn.Module, batches, loss_fn, base_loss: float) -> _Graph | None:
        """The traced model, or None (evaluate whole) when it cannot be traced or its graph does
        not reproduce ``base_loss`` (e.g. a branch on ``self.training`` fixed at tracing, or
        dropout, whose random draws differ between the two runs)."""
        try:
            traced = fx.symbolic_trace(copy.deepcopy(model))
            again = adaptive_bn_loss(traced, batches, loss_fn)
        except Exception as exc:  # any failure to trace or run the graph: evaluate whole models
            log.info("cuts are evaluated on the whole model (torch.fx: %s)", exc)
            return None
        if not math.isclose(again, base_loss, rel_tol=1e-5, abs_tol=1e-7):
            log.info("cuts are evaluated on the whole model (its traced graph gives loss %g, not %g)",
                     again, base_loss)
            return None
        return cls(traced, batches, loss_fn, again)

    def frontier(self, modules: set[str]) -> _Frontier | None:
        """The values a cut of the layers ``modules`` starts from; None (evaluate whole) when one
        of them is not called as a layer in the graph (a subclass torch.fx traces through), when a
        layer with buffers runs both before and after the cut (its statistics would see both), or
        when the values would take more than :data:`FRONTIER_BYTES`."""
        if not modules <= self.called:
            return None
        first = next(i for i, n in enumerate(self.nodes)
                     if n.op in ("call_module", "get_attr") and _within(n.target, modules))
        before = {n.target for n in self.nodes[:first] if n.op == "call_module"}
        after = {n.target for n in self.nodes[first:] if n.op == "call_module"}
        if before & after & self.stateful:
            return None
        head = self.nodes[:first]
        read = [n for n in head if any(self.index[u] >= first for u in n.users)]
        prefix = fx.GraphModule(self.model, _subgraph([], head, read))
        values: dict[bool, list[tuple]] = {True: [], False: []}
        saved = {name: b.clone() for name, b in self.model.named_buffers()}  # non-persistent ones too
        try:
            for mode in (False, True):  # training mode (BatchNorm normalises by each batch's statistics)
                # changes the running statistics that evaluation mode reads: it comes last
                self.model.train(mode)
                for x, _ in self.batches:
                    with torch.no_grad():
                        values[mode].append(prefix(to_model(x, self.model)))
                    size = sum(map(_bytes, values[mode])) / len(values[mode]) * len(self.batches) * 2
                    if size > FRONTIER_BYTES:
                        log.info("a frontier of about %d bytes is over %d: these cuts are evaluated on the whole "
                                 "model", size, FRONTIER_BYTES)
                        return None
        finally:
            for name, b in self.model.named_buffers():
                b.copy_(saved[name])
            self.model.eval()
        return _Frontier(self, self.nodes[first:], read, values)


class _Frontier:
    """One group's frontier values, and the rest of the graph that a cut model runs from them."""

    def __init__(self, graph: _Graph, rest: list[fx.Node], read: list[fx.Node], values) -> None:
        self.graph, self.read, self.values = graph, read, values
        self.suffix = _subgraph(read, rest, None)  # the same for every cut of the group
        self.targets = [n.target for n in self.suffix.nodes if n.op in ("call_module", "get_attr")]

    def loss(self, trial: nn.Module) -> float | None:
        """:func:`~leanconv.width.candidates.adaptive_bn_loss` of ``trial`` (the model with only
        this group cut), computed from the frontier (None: it could not run; evaluate whole)."""
        batches, loss_fn = self.graph.batches, self.graph.loss_fn
        try:
            named = {t: _named(t, trial, self.graph.model) for t in self.targets}
        except AttributeError as exc:
            log.info("a cut is evaluated on the whole model (%s)", exc)
            return None
        suffix = fx.GraphModule(named, self.suffix)
        # copies: an in-place op of the graph (x.add_(...)) must not change the frontier
        with reestimating(suffix) as norms, torch.no_grad():
            for row in self.values[True] if norms else ():
                suffix(*_copied(row))
        suffix.eval()
        with torch.no_grad():
            total = sum(float(loss_fn(suffix(*_copied(row)), y)) * len(y)
                        for row, (_, y) in zip(self.values[False], batches))
        return total / sum(len(y) for _, y in batches)


def _named(target: str, trial: nn.Module, traced: fx.GraphModule):
    """What a graph node names: the cut model's layer or attribute, else the traced unpruned
    model's (constants that tracing stored on the traced copy, ``_tensor_constant0``)."""
    for root in (trial, traced):
        owner, _, name = target.rpartition(".")
        try:
            return getattr(root.get_submodule(owner) if owner else root, name)
        except AttributeError:
            pass
    raise AttributeError(f"the traced graph names {target!r}, which neither model has")


def _subgraph(inputs: list[fx.Node], nodes: list[fx.Node], outputs: list[fx.Node] | None) -> fx.Graph:
    """A graph running ``nodes`` of a traced graph, taking ``inputs`` as arguments (the graph's
    own placeholders, with their defaults, where they are among ``nodes``) and returning
    ``outputs`` as a tuple (None: the graph's own output node is among ``nodes``)."""
    graph, env = fx.Graph(), {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    if outputs is not None:
        graph.output(tuple(env[n] for n in outputs))
    return graph


def _bytes(row) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(row) if torch.is_tensor(t))


def _copied(row) -> tuple:
    return tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, row)
