"""The importance protocol: a criterion maps a model and its channel groups to scores.

A channel group (:class:`leanconv.graph.ChannelGroup`) is a set of coupled channels that
must be removed together; :mod:`leanconv.graph` builds the groups from a dependency graph and
a criterion only scores them. Higher score = more important = kept longer.

To add a criterion, subclass :class:`Criterion` (or write any callable with the same
signature) and register it with :func:`register_criterion`; the engine never looks at which
criterion it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.graph.types import ChannelGroup
from leanconv.util.model_io import run_forward, to_model
from leanconv.util.modes import eval_mode

__all__ = [
    "ScoringData",
    "Criterion",
    "register_criterion",
    "create_criterion",
    "criterion_names",
    "check_batches",
]


@dataclass
class ScoringData:
    """Data a criterion may use: a few batches of the *validation* split (never test data)
    and the loss. ``train_batches`` is used only by criteria that say so."""

    batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    extra: dict = field(default_factory=dict)


class Criterion:
    """Base class for importance criteria.

    ``__call__(model, groups, data)`` returns one 1-D float tensor per group, of length
    ``group.size``, higher meaning more important. ``needs_data`` tells the CLI whether to
    load validation batches. Never return ``None`` or skip a group: raise instead.
    """

    name: str = "criterion"
    needs_data: bool = False

    def __call__(
        self, model: nn.Module, groups: Sequence[ChannelGroup], data: ScoringData | None
    ) -> list[torch.Tensor]:
        raise NotImplementedError


_CRITERIA: dict[str, Callable[..., Criterion]] = {}


def register_criterion(name: str) -> Callable[[Callable[..., Criterion]], Callable[..., Criterion]]:
    """Decorator: make a criterion factory available as ``create_criterion(name)``."""

    def wrap(factory: Callable[..., Criterion]) -> Callable[..., Criterion]:
        _CRITERIA[name] = factory
        return factory

    return wrap


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def create_criterion(name: str, **kwargs) -> Criterion:
    if name not in _CRITERIA:
        raise LeanconvError(f"unknown pruning method {name!r}; choose one of: {', '.join(criterion_names())}")
    try:
        return _CRITERIA[name](**kwargs)
    except (TypeError, ValueError) as exc:  # an unknown option or a value of the wrong kind
        raise LeanconvError(f"cannot create criterion {name!r} with {kwargs}: {exc}") from exc


def check_scores(groups: Iterable[ChannelGroup], scores: Sequence[torch.Tensor], name: str) -> None:
    """Raise :class:`LeanconvError` if a criterion returned the wrong number, kind or shape of
    scores (the engine calls this on every criterion, a user's own included)."""
    groups = list(groups)
    if len(scores) != len(groups):
        raise LeanconvError(f"criterion {name} returned {len(scores)} score tensors for {len(groups)} groups")
    for g, s in zip(groups, scores):
        if not torch.is_tensor(s) or s.shape != (g.size,) or not torch.isfinite(s).all():
            got = f"shape {tuple(s.shape)}" if torch.is_tensor(s) else type(s).__name__
            raise LeanconvError(f"criterion {name} returned bad scores for group {g.root}: need a finite tensor of "
                                f"shape ({g.size},), got {got}{' with NaN/inf' if torch.is_tensor(s) and s.shape == (g.size,) else ''}")


def check_batches(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  loss_fn: Callable | None = nn.functional.cross_entropy) -> None:
    """Scoring batches must fit ``model``: floating-point, finite images it runs on and, for the
    default cross-entropy loss, one integer label per image within its outputs (other losses
    get only the image checks). Raises :class:`LeanconvError` naming the problem (instead of
    an error from deep inside a criterion)."""
    class_labels = loss_fn is nn.functional.cross_entropy
    for i, (x, y) in enumerate(batches):
        if not (torch.is_tensor(x) and x.is_floating_point() and x.dim() >= 2):
            raise LeanconvError(f"scoring batch {i}: images must be a floating-point tensor [N, C, H, W], "
                                f"got {getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
        if class_labels and not (torch.is_tensor(y) and y.dim() == 1 and not y.is_floating_point()
                                 and len(y) == len(x)):
            raise LeanconvError(f"scoring batch {i}: need one integer label per image ({len(x)} images), "
                                f"got labels {getattr(y, 'dtype', type(y).__name__)} {list(getattr(y, 'shape', []))}")
        if not bool(torch.isfinite(x).all()):
            raise LeanconvError(f"scoring batch {i} holds NaN or infinite pixels")
    if not batches:
        return
    with eval_mode(model), torch.no_grad():
        out = run_forward(model, to_model(batches[0][0][:2], model))
    classes = out.shape[-1] if class_labels and torch.is_tensor(out) and out.dim() == 2 else None
    for i, (_, y) in enumerate(batches):
        if classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise LeanconvError(f"scoring batch {i}: labels must lie in [0, {classes}) for this model's "
                                f"{classes} outputs, got {int(y.min())}..{int(y.max())}")
