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
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.importance.base import check_batches
from leanconv.importance.hessian.hvp import assign_groups, grouped_hvp, rademacher_probes
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode
from leanconv.util.progress import Progress

__all__ = [
    # estimating
    "channel_traces",
    "METHODS",
    "default_params",
    # results
    "TraceResult",
    "layer_traces",
]

log = logging.getLogger(__name__)

METHODS = ("auto", "vmap", "double_backward", "lean_double_backward")
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TraceResult:
    """Hutchinson estimates of per-output-channel Hessian block traces.

    ``traces[name][p]`` estimates ``Tr(H_pp)`` for channel ``p`` of weight ``name`` (the block
    trace, not divided by its size); ``stderr[name][p]`` is the standard error of that mean
    over ``probes`` probes. ``converged`` tells whether the stopping rule was met before
    ``max_probes``; ``achieved_rel_stderr`` is the value of the rule's statistic at the stop.
    ``method`` is the HVP method that ran; ``seconds`` the wall time of the estimate.
    """

    traces: dict[str, Tensor]
    stderr: dict[str, Tensor]
    numel_per_channel: dict[str, int]
    probes: int
    converged: bool
    method: str
    seconds: float
    achieved_rel_stderr: float = math.nan

    def shrunk_traces(self) -> dict[str, Tensor]:
        """Each channel's trace estimate pulled toward its weight's mean by how noisy it is.

        Per weight (empirical Bayes, normal model): with raw estimates ``t_p``, standard
        errors ``s_p``, mean ``m`` and ``tau^2 = max(0, var(t) - mean(s^2))`` (the spread
        between channels that the noise does not explain), channel ``p`` gets
        ``m + tau^2 / (tau^2 + s_p^2) * (t_p - m)``. Where the probes cannot tell the channels
        apart (``tau = 0``) every channel gets the mean; as the standard errors go to zero the
        raw estimates come back. Weights with one channel are kept as they are."""
        out = {}
        for name, t in self.traces.items():
            if t.numel() < 2:
                out[name] = t.clone()
                continue
            t64, s2 = t.double(), self.stderr[name].double().pow(2)
            m = t64.mean()
            tau2 = (t64.var(unbiased=False) - s2.mean()).clamp_min(0)
            keep = tau2 / (tau2 + s2) if tau2 > 0 else torch.zeros_like(s2)
            out[name] = (m + keep * (t64 - m)).to(t.dtype)
        return out

    def relative_traces(self, shrink: bool = False) -> dict[str, Tensor]:
        """``Tr(H_pp) / numel(W_p)``: HAP's average diagonal of each channel's Hessian block
        (from :meth:`shrunk_traces` with ``shrink``)."""
        traces = self.shrunk_traces() if shrink else self.traces
        return {n: t / self.numel_per_channel[n] for n, t in traces.items()}

    def hap_sensitivity(self, params: Mapping[str, Tensor] | nn.Module, shrink: bool = False) -> dict[str, Tensor]:
        """HAP's channel sensitivity ``(Tr(H_pp) / numel(W_p)) * ||W_p||^2`` (methods.md, section 3).

        ``params`` maps the weight names of this result to the weights (or is the model);
        ``shrink`` uses :meth:`shrunk_traces` instead of the raw estimates."""
        if isinstance(params, nn.Module):
            params = dict(params.named_parameters())
        out = {}
        for name, rel in self.relative_traces(shrink).items():
            if name not in params:
                raise LeanconvError(f"no weight named {name!r} to score; pass the weights the traces were taken of")
            w = params[name].detach()
            if w.shape[0] != rel.shape[0]:
                raise LeanconvError(f"weight {name!r} has {w.shape[0]} channels but its traces have {rel.shape[0]}")
            sq = w.reshape(w.shape[0], -1).double().pow(2).sum(1)
            out[name] = (rel.double() * sq).to(rel.dtype)
        return out

    def to_dict(self) -> dict:
        """A JSON-able record (plain lists and numbers)."""
        return {
            "traces": {n: t.tolist() for n, t in self.traces.items()},
            "stderr": {n: t.tolist() for n, t in self.stderr.items()},
            "numel_per_channel": dict(self.numel_per_channel),
            "probes": self.probes,
            "converged": self.converged,
            "method": self.method,
            "seconds": self.seconds,
            "achieved_rel_stderr": self.achieved_rel_stderr,
            "dtype": str(next(iter(self.traces.values()), torch.zeros(0)).dtype).removeprefix("torch."),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "TraceResult":
        """Inverse of :meth:`to_dict` (bit-exact: float32 values survive the JSON round trip)."""
        dtype = getattr(torch, str(d.get("dtype", "float64")), None)
        if not isinstance(dtype, torch.dtype):
            raise LeanconvError(f"bad dtype {d.get('dtype')!r} in a Hessian trace record; delete the record")
        as_t = lambda m: {n: torch.tensor(v, dtype=dtype) for n, v in m.items()}  # noqa: E731
        return cls(
            traces=as_t(d["traces"]),
            stderr=as_t(d["stderr"]),
            numel_per_channel={n: int(v) for n, v in d["numel_per_channel"].items()},
            probes=int(d["probes"]),
            converged=bool(d["converged"]),
            method=str(d["method"]),
            seconds=float(d["seconds"]),
            achieved_rel_stderr=float(d.get("achieved_rel_stderr", math.nan)),
        )


def layer_traces(result: TraceResult) -> dict[str, float]:
    """HAWQ-V2's layer trace ``Tr(H_ll)``: the sum of the layer's channel block traces."""
    return {n: float(t.double().sum()) for n, t in result.traces.items()}


def default_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every ``Conv2d`` and ``Linear`` (subclasses included), by path name."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(m.weight, Tensor):
            out[f"{path}.weight" if path else "weight"] = m.weight
    return out


# ---------------------------------------------------------------- statistics


class _Moments:
    """Running sums of per-channel samples ``x`` and ``x^2`` (float64) for mean and stderr."""

    def __init__(self, sel: Mapping[str, Tensor]):
        self.n = 0
        self.s1 = {n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in sel.items()}
        self.s2 = {n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in sel.items()}

    def add(self, vs: Mapping[str, Tensor], hv: Mapping[str, Tensor]) -> None:
        for n, v in vs.items():
            k, c = v.shape[0], v.shape[1]
            x = (v * hv[n]).reshape(k, c, -1).sum(-1).double().cpu()  # [k, C]: v_p . (Hv)_p
            self.s1[n] += x.sum(0)
            self.s2[n] += x.pow(2).sum(0)
        self.n += next(iter(vs.values())).shape[0]

    def mean(self) -> dict[str, Tensor]:
        return {n: s / self.n for n, s in self.s1.items()}

    def stderr(self) -> dict[str, Tensor]:
        out = {}
        for n, s1 in self.s1.items():
            var = (self.s2[n] - s1 * s1 / self.n).clamp_min(0) / max(self.n - 1, 1)
            out[n] = (var / self.n).sqrt()
        return out


def _rel_stderr_quantile(mean: Mapping[str, Tensor], se: Mapping[str, Tensor], q: float) -> float:
    """The ``q``-quantile (nearest rank, no interpolation) over channels of ``stderr / |mean|``.
    A channel whose every sample is exactly 0 (dead) counts as 0; mean 0 with spread as inf."""
    m = torch.cat([mean[n] for n in mean]).abs()
    s = torch.cat([se[n] for n in mean])
    rel = torch.where(s == 0, torch.zeros_like(s), s / m)
    rank = max(1, math.ceil(q * rel.numel()))
    return float(rel.sort().values[rank - 1])


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


def _select(model: nn.Module, params: Mapping[str, Tensor] | None) -> tuple[dict, dict]:
    """Split the model's parameters into the selected weights and the fixed rest (detached)."""
    named = dict(model.named_parameters())
    sel = default_params(model) if params is None else dict(params)
    for n in sel:
        if n not in named or named[n] is not sel[n]:
            raise LeanconvError(f"{n!r} is not a parameter of the model under that name")
        if sel[n].dim() < 1:
            raise LeanconvError(f"parameter {n!r} is a scalar; it has no channels")
    fixed = {n: p.detach() for n, p in named.items() if n not in sel}
    return {n: p.detach() for n, p in sel.items()}, fixed


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
    """
    batches = list(batches)
    batches = [(to_model(x, model), to_model(y, model)) for x, y in batches]
    sel, fixed = _select(model, params)
    rule = (min_probes, max_probes, rel_stderr, probes_per_step, stop_quantile)
    _check_args(batches, sel, rule, method)
    check_batches(model, batches, loss_fn)
    groups = assign_groups(list(sel), probe_groups)
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
    mom, stat, timings, used = _Moments(sel), math.inf, {}, method
    while mom.n < max_probes:
        vs = rademacher_probes(gen, sel, min(step, max_probes - mom.n))
        hv, used = _timed_hvp(method, timings, model, weights, batches, vs, loss_fn, step)
        mom.add(vs, hv)
        if mom.n >= min_probes:
            stat = _rel_stderr_quantile(mom.mean(), mom.stderr(), q)
        if progress is not None:
            progress(mom.n, max_probes, {"method": used, "rel_stderr": stat})
        if mom.n >= min_probes and stat <= rel_stderr:
            break
    log.debug("Hessian traces: %d probes, rel. stderr %.4g, method %s", mom.n, stat, used)
    return mom, used, stat
