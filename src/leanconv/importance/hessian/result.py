"""What a per-channel curvature estimate returns (:class:`TraceResult`), the running moments
behind its standard errors, and the choice of the weights it covers: shared by every estimator
(Hutchinson probes in :mod:`.traces`, Hutch++ in :mod:`.hutchpp`, the exact Gauss-Newton
diagonal in :mod:`.gauss_newton`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError

__all__ = ["TraceResult", "layer_traces", "default_params", "select_weights", "Moments", "rel_stderr_quantile"]


@dataclass
class TraceResult:
    """Hutchinson estimates of per-output-channel Hessian block traces.

    ``traces[name][p]`` estimates ``Tr(H_pp)`` for channel ``p`` of weight ``name`` (the block
    trace, not divided by its size); ``stderr[name][p]`` is the standard error of that mean
    over ``probes`` probes. ``converged`` tells whether the stopping rule was met before
    ``max_probes``; ``achieved_rel_stderr`` is the value of the rule's statistic at the stop.
    ``method`` is the HVP method that ran; ``seconds`` the wall time of the estimate.
    ``quadratic[name][p]``, where the estimator gives it (``gauss-newton``), is the whole
    block's quadratic form ``W_p^T H_pp W_p`` (HAP's trace form approximates it by
    ``Tr(H_pp) / numel(W_p) * ||W_p||^2``).
    """

    traces: dict[str, Tensor]
    stderr: dict[str, Tensor]
    numel_per_channel: dict[str, int]
    probes: int
    converged: bool
    method: str
    seconds: float
    achieved_rel_stderr: float = math.nan
    quadratic: dict[str, Tensor] | None = None

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
            "quadratic": None if self.quadratic is None else {n: t.tolist() for n, t in self.quadratic.items()},
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
            quadratic=None if d.get("quadratic") is None else as_t(d["quadratic"]),
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


class Moments:
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


def rel_stderr_quantile(mean: Mapping[str, Tensor], se: Mapping[str, Tensor], q: float) -> float:
    """The ``q``-quantile (nearest rank, no interpolation) over channels of ``stderr / |mean|``.
    A channel whose every sample is exactly 0 (dead) counts as 0; mean 0 with spread as inf."""
    m = torch.cat([mean[n] for n in mean]).abs()
    s = torch.cat([se[n] for n in mean])
    rel = torch.where(s == 0, torch.zeros_like(s), s / m)
    rank = max(1, math.ceil(q * rel.numel()))
    return float(rel.sort().values[rank - 1])


def select_weights(model: nn.Module, params: Mapping[str, Tensor] | None) -> tuple[dict, dict]:
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
