"""Hessian-aware channel importance (``hap``).

Yu, Yao, Gholami et al., "Hessian-Aware Pruning and Optimal Neural Implant", WACV 2022. The
second-order loss change from zeroing output channel ``p`` of a weight ``W``, with the
channel's Hessian block approximated by its average diagonal, is HAP's sensitivity

    S_p = ( Tr(H_pp) / numel(W_p) ) * ||W_p||^2,

with ``Tr(H_pp)`` estimated per channel by Hutchinson probes
(:func:`leanconv.importance.hessian.channel_traces`: batched Hessian-vector products with a
standard-error stopping rule). Group channel ``k`` scores the sum of ``S`` over the group's
conv/linear ``"out"`` members (methods.md, section 3: coupled channels are scored as a group,
by the sum of the member sensitivities); BatchNorm and ``"in"`` members carry no ``S``.
Only the weights of those members are probed: a Rademacher vector restricted to them still
gives unbiased block traces, with less variance from cross terms.

With a few dozen probes most per-channel estimates are dominated by noise (on the trained
ResNet-20 with 32 probes, a median relative standard error of ~1.1, and a quarter of the
channels with a negative estimate). With ``shrink=True`` the traces are first pulled toward
their layer's mean by their standard errors
(:meth:`~leanconv.importance.hessian.TraceResult.shrunk_traces`), so that a channel is not
ranked by noise. It is off by default: on that ResNet-20 it was less accurate after
fine-tuning than the raw estimates (README, Benchmarks).

Two choices make the estimate precise (README, "HAP's curvature"): ``estimator`` (a
``channel_traces`` setting: ``hutchinson``, the paper's; ``hutch++``; or ``gauss-newton``, the
exact Gauss-Newton blocks, equal to the Hessian's own blocks for piecewise-linear networks) and
``form``: ``"trace"`` is the paper's ``S_p`` above, ``"block"`` the whole quadratic form
``W_p^T H_pp W_p`` it approximates (only the Gauss-Newton estimator computes it). A bare
criterion is the paper's (Hutchinson, trace form); a run (:func:`~leanconv.importance.run_criterion`)
defaults to :data:`HAP_ESTIMATOR` with its block form, chosen by measurement.

The criterion keeps the estimate it computed in ``last_traces`` (a ``TraceResult``) so that
a caller can write the sensitivity report without a second estimate.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.graph.types import ChannelGroup, Member
from leanconv.importance.base import Criterion, ScoringData, register_criterion
from leanconv.importance.hessian import cache, traces
from leanconv.importance.scoring import is_weight_layer, member_module, require_batches, sum_over_members, to_scores

__all__ = ["HAP", "hap", "probe_settings", "MIN_PROBES", "FORMS", "HAP_ESTIMATOR", "default_form"]

MIN_PROBES = 8  # probes every estimate runs before the stopping rule may stop it
FORMS = ("trace", "block")  # Tr(H_pp) / numel(W_p) * ||W_p||^2 (the paper), or W_p^T H_pp W_p itself
# What a run (prune, compare, 3-D pruning) uses unless told: measured more accurate right after the
# cut than the paper's probes, and cheaper (README, Benchmarks: criteria right after the cut).
HAP_ESTIMATOR = "gauss-newton"


def probe_settings(probes: int, seed: int = 0, min_probes: int | None = None) -> dict:
    """A run's probe count as :func:`~leanconv.importance.hessian.traces.channel_traces`
    settings: at most ``probes`` probes, at least ``min_probes`` (default: ``MIN_PROBES``, or
    ``probes`` if fewer) before the standard-error rule may stop, drawn from ``seed``. The one
    place a probe count becomes HAP settings (``prune``, 3-D pruning, ``sensitivity``, ``compare``)."""
    return {"max_probes": probes, "min_probes": min(MIN_PROBES, probes) if min_probes is None else min_probes,
            "seed": seed}


# channel_traces settings HAP forwards as they are; loss_fn, params and progress are HAP's own.
_OWN = {"model", "batches", "params", "loss_fn", "progress"}


_SETTINGS = frozenset(
    n for n, p in inspect.signature(traces.channel_traces).parameters.items() if p.kind is p.KEYWORD_ONLY
) - _OWN


def default_form(estimator: str) -> str:
    """The form a criterion takes unless told: the exact block where the estimator gives it
    (``gauss-newton``), else the paper's trace form."""
    return "block" if estimator == "gauss-newton" else "trace"


class HAP(Criterion):
    """Sum over the group's out members of ``Tr(H_pp) / numel(W_p) * ||W_p||^2`` (HAP, WACV 2022).

    ``trace_settings`` go to ``channel_traces`` (``min_probes``, ``max_probes``,
    ``rel_stderr``, ``probes_per_step``, ``method``, ``seed``, ...); ``cache_dir`` keeps the
    traces on disk keyed by model, data and settings; ``progress(done, total, info)`` is
    called after every step of probes; ``shrink`` ranks by the shrunk traces (module docstring)."""

    name = "hap"
    needs_data = True

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        progress: Callable[[int, int, dict], None] | None = None,
        shrink: bool = False,
        form: str | None = None,
        **trace_settings,
    ):
        form = default_form(trace_settings.get("estimator", "hutchinson")) if form is None else form
        if form not in FORMS:
            raise LeanconvError(f"hap: unknown form {form!r}; choose one of: {', '.join(FORMS)}")
        if form == "block" and trace_settings.get("estimator", "hutchinson") != "gauss-newton":
            raise LeanconvError("hap: the block form needs the exact Gauss-Newton blocks; use estimator "
                                "'gauss-newton' or the trace form")
        unknown = sorted(set(trace_settings) - _SETTINGS)
        if unknown:
            known = ", ".join(sorted(_SETTINGS))
            raise LeanconvError(f"hap: unknown setting(s) {', '.join(unknown)}; "
                                f"known: {known}, cache_dir, progress, shrink, form")
        self.cache_dir = cache_dir
        self.progress = progress
        self.shrink = shrink
        self.form = form
        self.trace_settings = trace_settings
        self.last_traces: traces.TraceResult | None = None

    def __call__(self, model: nn.Module, groups: Sequence[ChannelGroup], data: ScoringData | None) -> list[Tensor]:
        batches = require_batches(data, self.name)
        weights = _out_weights(model, groups)
        if not weights:
            raise LeanconvError("hap: no group has a conv or linear output member to score")
        kw = dict(params=weights, loss_fn=data.loss_fn, progress=self.progress, **self.trace_settings)
        if self.cache_dir is not None:
            result = cache.cached_channel_traces(model, batches, self.cache_dir, **kw)
        else:
            result = traces.channel_traces(model, batches, **kw)
        self.last_traces = result
        sens = result.quadratic if self.form == "block" else result.hap_sensitivity(weights, shrink=self.shrink)

        def score(module: nn.Module, member: Member) -> Tensor | None:
            s = sens.get(f"{member.module}.weight")
            if s is None:
                return None
            return s.index_select(0, torch.as_tensor(member.idxs, dtype=torch.long, device=s.device))

        totals = [sum_over_members(model, g, score, ("out",), self.name) for g in groups]
        return to_scores(totals, groups, self.name)


def _out_weights(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, nn.Parameter]:
    """Parameter name -> weight of every conv/linear out member of the groups."""
    out = {}
    for g in groups:
        for member in g.out_members():
            module = member_module(model, member, g)
            if is_weight_layer(module):
                out[f"{member.module}.weight"] = module.weight
    return out


@register_criterion("hap")
def hap(cache_dir: str | Path | None = None, progress=None, shrink: bool = False, form: str | None = None,
        **trace_settings) -> HAP:
    """Hessian-aware sensitivity (Yu et al. 2022)."""
    return HAP(cache_dir=cache_dir, progress=progress, shrink=shrink, form=form, **trace_settings)
