"""Per-channel Hessian block traces by Hutch++ (variance-reduced Hutchinson).

Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021,
estimate ``Tr(H)`` by taking the trace of a low-rank approximation exactly and probing only
what is left. For the block traces HAP needs (``Tr(H_pp)`` of every output channel ``p``) we
use the one-sided split that keeps each block's share exact:

    H = Q Q^T H + (I - Q Q^T) H,    Q = orth(H S),  S: k Rademacher vectors,

    Tr_p(Q Q^T H) = sum_{i in p} sum_j Q_ij (H Q)_ij           (exact, from k more HVPs),
    Tr_p((I - Q Q^T) H) = E_g[ g_p . ((I - Q Q^T) H g)_p ]      (m Rademacher probes g).

A network's Hessian has a few outlying eigenvalues (about one per class) that carry most of
the cross-channel coupling behind Hutchinson's noise; ``Q`` captures them, so the residual
probes see a matrix with far smaller off-diagonal blocks. A budget of ``probes`` HVPs is split
as in the paper: a third for the sketch, a third for ``H Q``, the rest for the residual.
With ``k`` at least the number of weights ``Q`` spans everything and the estimate is exact.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch
from torch import Tensor

from leanconv.importance.hessian.hvp import rademacher_probes
from leanconv.importance.hessian.result import Moments, TraceResult, rel_stderr_quantile
from leanconv.util.progress import Progress

__all__ = ["hutchpp_traces", "split_budget"]


def split_budget(probes: int, size: int) -> tuple[int, int]:
    """(sketch size k, residual probes m) for ``probes`` HVPs over ``size`` weights: k a third
    (never more than the weights), m the rest, at least 2 (a standard error needs two)."""
    k = max(1, min(probes // 3, size))
    return k, max(2, probes - 2 * k)


def hutchpp_traces(
    weights: tuple[dict, dict],
    hvp: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    *,
    probes: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceResult:
    """Hutch++ block traces of the selected weights (module docstring). ``weights`` is
    ``(selected, fixed)``; ``hvp(us)`` returns ``H u`` for stacked vectors ``us[name]: [m, *shape]``
    (the caller's method, in eval mode); the budget ``probes`` counts HVPs. ``stderr`` is the
    standard error of the residual part (the sketched part is exact)."""
    sel, _ = weights
    start = time.perf_counter()
    names = list(sel)
    size = sum(p.numel() for p in sel.values())
    k, m = split_budget(probes, size)
    gen = torch.Generator().manual_seed(seed)
    hs = hvp(rademacher_probes(gen, sel, k))
    q = torch.linalg.qr(_flat(hs, names).double().T).Q  # [size, k], orthonormal columns
    qs = _unflat(q.T, sel)
    hq = hvp({n: t.to(sel[n].dtype) for n, t in qs.items()})
    if progress is not None:
        progress(2 * k, 2 * k + m, {"method": "hutch++", "stage": "sketch"})
    exact = {n: (qs[n] * hq[n].double()).reshape(k, sel[n].shape[0], -1).sum((0, 2)) for n in names}
    mom = Moments(sel)
    gs = rademacher_probes(gen, sel, m)
    hg = hvp(gs)
    coef = q.T @ _flat(hg, names).double().T  # [k, m]: Q^T H g
    back = _unflat((q @ coef).T, sel)  # Q Q^T H g, per weight [m, *shape]
    mom.add(gs, {n: hg[n].double() - back[n] for n in names})
    if progress is not None:
        progress(2 * k + m, 2 * k + m, {"method": "hutch++", "stage": "residual"})
    dtype = next(iter(sel.values())).dtype
    residual, se = mom.mean(), mom.stderr()
    traces = {n: exact[n] + residual[n] for n in names}
    return TraceResult(
        traces={n: traces[n].to(dtype) for n in names},
        stderr={n: se[n].to(dtype) for n in names},
        numel_per_channel={n: p[0].numel() for n, p in sel.items()},
        probes=2 * k + m,
        converged=True,
        method="hutch++",
        seconds=time.perf_counter() - start,
        achieved_rel_stderr=rel_stderr_quantile(traces, {n: se[n] for n in names}, 0.5),
    )


def _flat(vs: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """Stacked per-weight vectors ``[m, *shape]`` as one ``[m, size]`` matrix, in ``names`` order."""
    return torch.cat([vs[n].reshape(vs[n].shape[0], -1) for n in names], dim=1)


def _unflat(rows: Tensor, sel: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`_flat`: ``[m, size]`` back to per-weight ``[m, *shape]`` (float64)."""
    parts = rows.split([p.numel() for p in sel.values()], dim=1)
    return {n: part.reshape(rows.shape[0], *p.shape) for (n, p), part in zip(sel.items(), parts)}
