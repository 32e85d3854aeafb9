"""Block importance for depth pruning: score residual blocks, measure a ranking.

Paper: Wang, Li, Zhang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive
Pruning Framework" (ICML 2021), the depth dimension ``d`` (methods.md, section 1). The
blocks are those :func:`leanconv.prune3d.blocks.find_residual_blocks` lists; the least
important are bypassed by :func:`leanconv.prune3d.blocks.prune_blocks`.

**Block importance** (higher = keep): ``"loss"`` is the increase of the mean loss on the
given batches when the block alone is bypassed (model in eval mode); ``"hessian"`` is the
sum over the block's weights (every parameter with >= 2 dims) of HAP's channel sensitivity
``Tr(H_pp) / numel(W_p) * ||W_p||^2`` (Yu et al., WACV 2022), estimated by
:func:`leanconv.importance.hessian.channel_traces`. :func:`bypass_loss_curve` measures a
ranking: the loss after bypassing its ``k`` least important blocks (lower is better);
:func:`rank_correlation` compares two rankings (Spearman).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.importance.hessian import channel_traces
from leanconv.prune3d.blocks import BlockInfo, _alive, _least_important, _module, bypassed
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode
from leanconv.util.progress import Progress

__all__ = ["IMPORTANCE_METHODS", "block_importance", "bypass_loss_curve", "rank_correlation"]

IMPORTANCE_METHODS = ("loss", "hessian")
LossFn = Callable[[Tensor, Tensor], Tensor]


def _mean_loss(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], loss_fn: LossFn) -> float:
    """Size-weighted mean of ``loss_fn`` (a batch mean) over ``batches``, in eval mode."""
    total, n = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            total += float(loss_fn(model(to_model(x, model)), to_model(y, model))) * len(y)
            n += len(y)
    return total / n


def _batches(batches: Iterable[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    batches = list(batches)
    if not batches or sum(len(y) for _, y in batches) == 0:
        raise LeanconvError("no data batches given to score blocks; pass at least one (x, y) batch")
    return batches


def _loss_importance(model, blocks, batches, loss_fn, progress) -> dict[str, float]:
    base = _mean_loss(model, batches, loss_fn)
    out = {}
    for i, b in enumerate(blocks):
        with bypassed(model, [b.path]):
            out[b.path] = _mean_loss(model, batches, loss_fn) - base
        if progress is not None:
            progress(i + 1, len(blocks), {"block": b.path, "importance": out[b.path]})
    return out


def _hessian_importance(model, blocks, batches, loss_fn, progress, options) -> dict[str, float]:
    owned = {}
    for b in blocks:
        weights = {f"{b.path}.{n}": p for n, p in _module(model, b.path).named_parameters() if p.dim() >= 2}
        if not weights:
            raise LeanconvError(f"block {b.path!r} has no conv or linear weights to score by Hessian; "
                                "use method='loss'")
        owned[b.path] = weights
    params = {n: p for weights in owned.values() for n, p in weights.items()}
    traces = channel_traces(model, batches, params, loss_fn=loss_fn, progress=progress, **options)
    sens = traces.hap_sensitivity(params)
    return {path: float(sum(sens[n].double().sum() for n in weights)) for path, weights in owned.items()}


def block_importance(
    model: nn.Module,
    blocks: Sequence[BlockInfo],
    batches: Iterable[tuple[Tensor, Tensor]],
    method: str = "loss",
    *,
    loss_fn: LossFn = F.cross_entropy,
    hessian_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Importance of each block not yet bypassed, by path (higher = keep).

    ``"loss"``: mean loss on ``batches`` with the block alone bypassed minus the mean loss of
    the model as it is (eval mode; ~0 for a block that contributes nothing, negative when
    bypassing helps). ``"hessian"``: the sum of HAP sensitivities of the block's channels;
    ``hessian_options`` go to :func:`~leanconv.importance.hessian.channel_traces` (e.g.
    ``max_probes``, ``seed``). ``loss_fn(logits, y)`` returns the batch mean.
    """
    if method not in IMPORTANCE_METHODS:
        raise LeanconvError(f"unknown block importance {method!r}; choose one of: {', '.join(IMPORTANCE_METHODS)}")
    if hessian_options and method != "hessian":
        raise LeanconvError(f"options {sorted(hessian_options)} apply only to method='hessian'")
    batches, alive = _batches(batches), _alive(model, blocks)
    if method == "loss":
        return _loss_importance(model, alive, batches, loss_fn, progress)
    return _hessian_importance(model, alive, batches, loss_fn, progress, dict(hessian_options or {}))


def bypass_loss_curve(
    model: nn.Module,
    blocks: Sequence[BlockInfo],
    importance: Mapping[str, float],
    batches: Iterable[tuple[Tensor, Tensor]],
    ks: Sequence[int] | None = None,
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> list[float]:
    """Mean loss on ``batches`` after bypassing the ``k`` least important blocks by
    ``importance``, for each ``k`` in ``ks`` (default ``0 .. len(blocks)``). The lower the
    curve, the better the ranking; use batches not used for scoring. The model is unchanged."""
    batches, alive = _batches(batches), _alive(model, blocks)
    ranked = _least_important(alive, importance)
    ks = range(len(ranked) + 1) if ks is None else ks
    curve = []
    for k in ks:
        if not 0 <= k <= len(ranked):
            raise LeanconvError(f"cannot bypass {k} blocks; the model has {len(ranked)} removable blocks left")
        with bypassed(model, [b.path for b in ranked[:k]]):
            curve.append(_mean_loss(model, batches, loss_fn))
    return curve


def _ranks(values: Sequence[float]) -> Tensor:
    """Ranks 0..n-1 with ties given their mean rank."""
    v = torch.tensor(values, dtype=torch.float64)
    order = v.argsort()
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    for value in v.unique():
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def rank_correlation(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman rank correlation of two importance maps over their common blocks (1 = same
    order, -1 = reversed; NaN when either is constant)."""
    keys = [k for k in a if k in b]
    if len(keys) < 2:
        raise LeanconvError("need at least two blocks scored by both rankings to compare them")
    ra, rb = _ranks([a[k] for k in keys]), _ranks([b[k] for k in keys])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan
