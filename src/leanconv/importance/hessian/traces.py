"""Per-channel Hessian traces by Hutchinson's estimator (the core of HAP).

Paper: Yu, Yao, Gholami et al., "Hessian-Aware Pruning and Optimal Neural Implant", WACV 2022.
For output channel ``p`` of a weight ``W[C_out, ...]`` (the block ``W_p = W[p]``) HAP needs
the block trace ``Tr(H_pp)`` of the loss Hessian. Hutchinson (1990):

    Tr(H_pp) = E_v[ v_p . (H v)_p ],    v Rademacher (+-1) over ALL selected weights,

so one Hessian-vector product per probe ``v`` serves every channel of every layer at once
(the cross terms ``v_p . H_pq v_q``, q != p, have zero mean). HAP's sensitivity (paper, Eq. for
the second-order perturbation with the block approximated by its average diagonal) is

    S_p = ( Tr(H_pp) / numel(W_p) ) * ||W_p||^2.

HAWQ-V2 (Dong et al., 2020) uses the layer trace, the sum of the channel traces.

The loss is the mean over every given batch, ``L = sum_b (n_b / N) L_b`` (so
``H v = sum_b (n_b / N) H_b v``), with the model in eval mode (BN uses its running
statistics). The number of probes is chosen by the standard error of the estimate: after
``min_probes``, probes are added ``probes_per_step`` at a time until the MEDIAN over all
channels of ``stderr / |mean|`` is at most ``rel_stderr`` (the ``stop_quantile`` argument
selects a higher quantile for a stricter rule), or ``max_probes`` is reached. The median is
the default because near-dead channels (trace ~ 0) have an unbounded relative error that no
probe count fixes, while a pruning ranking needs the bulk of the channels to be right.

HVPs (:mod:`leanconv.importance.hessian.hvp`) are forward-over-reverse (``torch.func.jvp``
of ``torch.func.grad`` over ``functional_call``) vmapped over ``probes_per_step`` probes, or
double backward (``torch.autograd.grad(create_graph=True)``, then one grad of ``g . v`` per
probe), or ``lean_double_backward``: double backward with convolutions and eval batch norm
differentiated by plain ops: faster at any step size, and 8 probes a step give 1.4-1.55x the
probes per second of one at a time (ResNet-20, 1 CPU thread, ``benchmarks/bench_hessian.py``).
``method="auto"`` times one step of vmap and one of double backward (the lean variant when
the model has ``Conv2d`` or batch-norm layers) and keeps the faster (on a 2-core CPU double
backward won for ResNet-20, vmap for tiny nets); a method that fails falls back (vmap to
double backward, lean to plain double backward; e.g. an ``autograd.Function`` without
forward-mode AD). Probe ``i`` is the same Rademacher vector whichever method or step size
runs, so they agree up to rounding.

Precision. The variance of one sample is ``2 (||H_pp||_F^2 - ||diag H_pp||^2) + sum_{q != p}
||H_pq||_F^2``: every other channel's coupling adds noise, and cross-LAYER blocks can dwarf
a channel's own trace (10-250x its trace in standard deviation on the tiny test network;
a median relative stderr of ~1.3 after 24 probes on ResNet-20). HAP's 3 probes therefore
rank channels mostly by ``||W_p||^2``. ``probe_groups="layer"`` removes the cross-layer
part exactly at one HVP per layer per probe (:func:`~leanconv.importance.hessian.hvp.grouped_hvp`);
whether that buys more precision per HVP depends on the model (``benchmarks/bench_hessian.py``
measures it). Passing fewer ``params`` also removes their cross terms.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.importance.base import check_batches
from leanconv.importance.hessian.gauss_newton import gauss_newton_traces
from leanconv.importance.hessian.hutchpp import hutchpp_traces
from leanconv.importance.hessian.hvp import assign_groups, grouped_hvp, rademacher_probes
from leanconv.importance.hessian.result import (Moments, TraceResult, default_params, layer_traces,
                                                rel_stderr_quantile, select_weights)
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode
from leanconv.util.progress import Progress

__all__ = [
    # estimating
    "channel_traces",
    "METHODS",
    "ESTIMATORS",
    "default_params",
    # results
    "TraceResult",
    "layer_traces",
]

log = logging.getLogger(__name__)

METHODS = ("auto", "vmap", "double_backward", "lean_double_backward")
ESTIMATORS = ("hutchinson", "hutch++", "gauss-newton")
LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------- the estimator


def _check_args(batches, sel, rule, method):
    min_probes, max_probes, rel_stderr, step, q = rule
    if method not in METHODS:
        raise LeanconvError(f"unknown Hessian method {method!r}; choose one of: {', '.join(METHODS)}")
    if not batches:
        raise LeanconvError("no data batches given for the Hessian traces; pass at least one (x, y) batch")
    if not sel:
        raise LeanconvError("no weights selected for the Hessian traces; the model has no Conv2d or Linear")
    if min_probes < 2 or max_probes < min_probes:
        raise LeanconvError(f"need 2 <= min_probes <= max_probes, got {min_probes} and {max_probes}")
    if step < 1 or not rel_stderr > 0 or not 0 < q <= 1:
        raise LeanconvError("probes_per_step must be >= 1, rel_stderr > 0 and stop_quantile in (0, 1]")


def channel_traces(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    params: Mapping[str, Tensor] | None = None,
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
    min_probes: int = 8,
    max_probes: int = 64,
    rel_stderr: float = 0.05,
    probes_per_step: int = 8,  # shared forward+backward per step: measured best at 8 (bench_hessian)
    method: str = "auto",
    seed: int = 0,
    stop_quantile: float = 0.5,
    probe_groups: int | str = 1,
    estimator: str = "hutchinson",
    progress: Progress | None = None,
) -> TraceResult:
    """Estimate ``Tr(H_pp)`` for every output channel of the selected weights (HAP, WACV 2022).

    ``batches``: (x, y) validation batches; the loss is their size-weighted mean. ``params``:
    name -> Parameter of ``model`` (default :func:`default_params`). ``loss_fn(logits, y)``
    must return the batch mean. Probes are taken ``probes_per_step`` at a time (also the vmap
    width) until the ``stop_quantile`` quantile over channels of ``stderr / |trace|`` is at
    most ``rel_stderr`` (checked from ``min_probes`` on) or ``max_probes`` is reached.
    ``method="auto"`` times one step of vmap and one of double backward (falling back to
    double backward if vmap fails) and keeps the faster. ``probe_groups`` > 1 or ``"layer"``
    splits each probe by layer groups (see :mod:`leanconv.importance.hessian.hvp`): G times
    the HVPs per probe, no cross-group noise. The model's train/eval modes are restored
    afterwards; its weights are never modified.

    ``estimator``: ``"hutchinson"`` (the paper's probes, as above), ``"hutch++"``
    (:mod:`.hutchpp`: ``max_probes`` HVPs, a third spent on a sketch whose part of every
    block trace is exact; no stopping rule) or ``"gauss-newton"`` (:mod:`.gauss_newton`: the
    exact Gauss-Newton block traces from per-image Jacobians, no probes; cross-entropy only).
    """
    if estimator not in ESTIMATORS:
        raise LeanconvError(f"unknown Hessian estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    if estimator == "gauss-newton":
        return gauss_newton_traces(model, batches, params, loss_fn=loss_fn, progress=progress)
    batches = list(batches)
    batches = [(to_model(x, model), to_model(y, model)) for x, y in batches]
    sel, fixed = select_weights(model, params)
    rule = (min_probes, max_probes, rel_stderr, probes_per_step, stop_quantile)
    _check_args(batches, sel, rule, method)
    check_batches(model, batches, loss_fn)
    groups = assign_groups(list(sel), probe_groups)
    if estimator == "hutch++":
        timings: dict = {}

        def hvp(us):
            one = {n: 0 for n in sel}  # the sketch needs the whole H u; probe_groups do not apply
            return _timed_hvp(method, timings, model, (sel, fixed, one), batches, us, loss_fn, probes_per_step)[0]

        with eval_mode(model), torch.enable_grad():
            return hutchpp_traces((sel, fixed), hvp, probes=max_probes, seed=seed, progress=progress)
    start = time.perf_counter()
    with eval_mode(model), torch.enable_grad():
        mom, used, stat = _run_probes(model, (sel, fixed, groups), batches, loss_fn, method, seed, rule, progress)
    dtype = next(iter(sel.values())).dtype
    return TraceResult(
        traces={n: t.to(dtype) for n, t in mom.mean().items()},
        stderr={n: t.to(dtype) for n, t in mom.stderr().items()},
        numel_per_channel={n: p[0].numel() for n, p in sel.items()},
        probes=mom.n,
        converged=stat <= rel_stderr,
        method=used,
        seconds=time.perf_counter() - start,
        achieved_rel_stderr=stat,
    )


def _timed_hvp(method, timings, model, weights, batches, vs, loss_fn, chunk):
    """One step of HVPs with ``method`` (``auto`` resolved from ``timings``); returns (Hv, used)."""
    sel, fixed, groups = weights
    used = method
    lean = any(isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) for m in model.modules())
    double = "lean_double_backward" if lean else "double_backward"  # identical ops without conv / BN
    fallback = {"vmap": double, "lean_double_backward": "double_backward"}
    if method == "auto":  # one step of each (vmap first), then the faster one per HVP
        untried = [m for m in ("vmap", double) if m not in timings]
        used = untried[0] if untried else min(timings, key=timings.get)
    while True:
        t0 = time.perf_counter()
        try:
            hv = grouped_hvp(model, sel, fixed, batches, vs, groups, loss_fn=loss_fn, method=used, chunk=chunk)
            break
        except (RuntimeError, NotImplementedError) as exc:
            if method != "auto" or used not in fallback:
                raise
            log.info("%s Hessian-vector products failed (%s); using %s", used, exc, fallback[used])
            timings[used] = math.inf
            used = fallback[used]
    timings.setdefault(used, (time.perf_counter() - t0) / next(iter(vs.values())).shape[0])
    return hv, used


def _run_probes(model, weights, batches, loss_fn, method, seed, rule, progress):
    """The probe loop with its stopping rule; returns (moments, method used, statistic)."""
    min_probes, max_probes, rel_stderr, step, q = rule
    sel = weights[0]
    gen = torch.Generator().manual_seed(seed)
    mom, stat, timings, used = Moments(sel), math.inf, {}, method
    while mom.n < max_probes:
        vs = rademacher_probes(gen, sel, min(step, max_probes - mom.n))
        hv, used = _timed_hvp(method, timings, model, weights, batches, vs, loss_fn, step)
        mom.add(vs, hv)
        if mom.n >= min_probes:
            stat = rel_stderr_quantile(mom.mean(), mom.stderr(), q)
        if progress is not None:
            progress(mom.n, max_probes, {"method": used, "rel_stderr": stat})
        if mom.n >= min_probes and stat <= rel_stderr:
            break
    log.debug("Hessian traces: %d probes, rel. stderr %.4g, method %s", mom.n, stat, used)
    return mom, used, stat
