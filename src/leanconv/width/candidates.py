"""Choosing the per-layer allocation of a budget by measured quality (EagleEye).

A budget fixes how much to cut; the allocation says how many channels each layer loses. A
heuristic gives one allocation (a global ranking of normalised scores for a MAC or params
budget, a greedy knapsack for a latency budget). EagleEye (Li et al., ECCV 2020) instead
draws many allocations and keeps the one whose pruned model does best right after the cut,
judged with its BatchNorm statistics re-estimated on a few batches first (the *adaptive-BN
evaluation*, their Sec. 3.2: with the unpruned model's stale statistics, one-shot accuracy
hardly correlates with accuracy after fine-tuning).

Here the candidates are the heuristic allocation and ``candidates - 1`` drawn around it, one
random number per channel group from a generator seeded with ``seed``:

* MAC/params budgets (:func:`shifted_scores`): each group's scores shifted by
  ``SHIFT * N(0, 1)`` times their own standard deviation, which moves the group's cut by a
  share of its channels however tight its scores are;
* latency budgets (:func:`group_factors`): each group's prices multiplied by
  ``exp(SIGMA * N(0, 1))``.

Either changes only how much each group loses, never which channels within it (the criterion
decides those). Drawn duplicates are dropped. Each distinct candidate is realised on a copy, its
BatchNorm statistics re-estimated on the validation batches and its mean loss on the same
batches measured; the lowest loss wins (the first, i.e. the heuristic one, on ties), so the
winner is never worse on those batches than the heuristic allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.util.batchnorm import reestimate_batchnorm
from leanconv.util.model_io import to_model
from leanconv.util.progress import Progress

__all__ = ["SIGMA", "SHIFT", "MAX_CANDIDATES", "check_candidates", "group_factors", "shifted_scores",
           "adaptive_bn_loss", "choose"]

# Latency prices (a cut's measured loss per millisecond saved) differ by orders of magnitude
# between groups; exp(0.5 * z) scales one by 0.61-1.65 at one standard deviation.
SIGMA = 0.5
# A trained layer's scores sit close together once divided by their mean (l1 on the trained
# ResNet-20 / Fashion-MNIST: standard deviation 0.07-0.15 per layer), so scaling them like the
# prices, even by exp(0.1 * z), moves whole layers between no cut and their floor: every drawn
# allocation then had 1.4-6x the plain one's validation loss (sigma 0.1, 0.25, 0.5; 8 candidates,
# 2 seeds; never chosen). A shift in units of each layer's own spread does not depend on how
# tight it is. One-shot test accuracy (BN re-estimated on training images) of the choice among 8,
# l1 at 50% of the MACs, plain cut 79.67%: shift 0.25 gave 81.60 / 81.05% (seeds 0 / 1), 0.5 gave
# 77.91 / 80.08%, 1.0 never beat the plain cut. Shift 0.25, seeds 0-2 (README, "Budgets"): l1
# 81.05-82.22% at 50% and 37.85-42.95% at 30% (plain 36.80%); taylor 23.12-28.95% at 30%
# (plain 23.12%), 74.25-74.70% at 50% (plain 74.70%).
SHIFT = 0.25
MAX_CANDIDATES = 1000
DRAWS_PER_CANDIDATE = 3  # draws may repeat an allocation already there (coarse groups, round_to)

T = TypeVar("T")


def check_candidates(candidates: Any, seed: Any, has_data: bool) -> None:
    """Refuse a candidate count that is not a whole number in [1, MAX_CANDIDATES], a seed that
    is not a whole number >= 0, and several candidates without validation batches to judge them."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
        raise LeanconvError(f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, got {candidates!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LeanconvError(f"seed must be a whole number >= 0, got {seed!r}")
    if candidates > 1 and not has_data:
        raise LeanconvError("choosing among candidates measures each on validation batches: pass data=...")


def group_factors(groups: int, generator: torch.Generator, sigma: float = SIGMA) -> list[float]:
    """One log-normal factor ``exp(sigma * N(0, 1))`` per group, drawn from ``generator``."""
    return torch.exp(sigma * torch.randn(groups, generator=generator)).tolist()


def shifted_scores(scores: Sequence[torch.Tensor], generator: torch.Generator, sigma: float = SHIFT
                   ) -> list[torch.Tensor]:
    """Each group's scores plus one shift ``sigma * N(0, 1)`` times their own standard deviation."""
    shifts = torch.randn(len(scores), generator=generator).tolist()
    return [s + sigma * z * (float(s.std()) if s.numel() > 1 else 0.0) for s, z in zip(scores, shifts)]


def adaptive_bn_loss(model: nn.Module, batches: Sequence, loss_fn: Callable) -> float:
    """Mean loss of ``model`` on ``(images, labels)`` ``batches`` in eval mode, right after its
    BatchNorm statistics are re-estimated on the same batches (EagleEye's adaptive-BN
    evaluation). Changes ``model``'s statistics: pass a copy to keep them."""
    reestimate_batchnorm(model, batches)
    model.eval()
    with torch.no_grad():
        total = sum(float(loss_fn(model(to_model(x, model)), y)) * len(y) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def choose(first: T, draw: Callable[[torch.Generator], T | None], *, key: Callable[[T], Hashable],
           realise: Callable[[T], nn.Module], candidates: int, seed: int, data,
           progress: Progress | None = None) -> tuple[T, dict[str, Any]]:
    """The candidate whose realised model has the lowest :func:`adaptive_bn_loss` on
    ``data.batches``, among ``first`` (the heuristic allocation) and up to ``candidates - 1``
    distinct ones from ``draw(generator)`` (None: a draw that fits no allocation), and the
    record ``{"candidates": n, "losses": [...], "chosen": index}`` (losses in evaluation
    order, ``first``'s at index 0). ``realise`` builds a model to judge (it is changed, so
    never the one to keep); each is judged as soon as it is drawn, so only the best is held."""
    generator = torch.Generator().manual_seed(seed)
    batches, loss_fn = list(data.batches), data.loss_fn
    report = progress or (lambda done, total, info: None)
    seen, losses, best = set(), [], first

    def judge(candidate: T) -> None:
        nonlocal best
        seen.add(key(candidate))
        losses.append(adaptive_bn_loss(realise(candidate), batches, loss_fn))
        if losses[-1] < min(losses[:-1], default=float("inf")):
            best = candidate
        report(len(losses), candidates, {"stage": "candidates"})

    judge(first)
    for _ in range(DRAWS_PER_CANDIDATE * candidates):
        if len(seen) >= candidates:
            break
        drawn = draw(generator)
        if drawn is not None and key(drawn) not in seen:
            judge(drawn)
    chosen = min(range(len(losses)), key=lambda i: (losses[i], i))
    return best, {"candidates": len(losses), "losses": [round(loss, 6) for loss in losses], "chosen": chosen}
