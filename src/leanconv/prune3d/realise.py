"""Realise a point ``(d, w, r)`` of three-dimensional pruning on a trained model.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021 (methods.md Sec. 1, steps 1 and 6). The three edits are applied in this order:

1. **Depth** ``d`` = kept removable residual blocks / removable blocks of the original model
   (:func:`leanconv.width.find_residual_blocks` on the unpruned model). The least important
   blocks by ``"loss"`` importance (loss increase when the block alone is bypassed, on
   validation batches) are replaced by ``nn.Identity``; each stage keeps at least
   ``min_per_stage`` blocks. ``d`` is snapped to the nearest whole block count.
2. **Width** ``w``: a channel multiplier has no single meaning once a global criterion
   prunes some layers more than others, so leanconv defines it by cost: **width ``w`` keeps
   ``w^2`` of the MACs of the model as it is after the depth step** (a uniform multiplier
   ``w`` scales every inner conv by ``w^2``; the stem and the classifier, which scale by
   ``w``, make the uniform multiplier a little cheaper than this). Channels are removed by
   :func:`leanconv.width.prune_to_budget` with any registered criterion (default ``hap``,
   scores on validation batches), which lands within 2% of that share. The realised ``w``
   is recorded as ``sqrt(counted MACs after / before the width step)``.
3. **Resolution** ``r`` = input side / original side: ``side = round(r * original side)``
   (at least 8), recorded by :func:`leanconv.width.set_resolution`; loaders resize the data
   to ``side`` (``resolution=side``).

The realised model's MACs (multiply-accumulates, one image; FLOPs = 2 x MACs) are counted by
:func:`leanconv.cost.count` at the new input shape. Validation data only: the test split is
never used for a decision here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cost import count
from leanconv.data import load_dataset
from leanconv.data.splits import DatasetSplits
from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData, run_criterion
from leanconv.importance.hessian.hap import HAP_ESTIMATOR
from leanconv.width.budget import prune_to_budget
from leanconv.width.reconstruct import reconstruct_on_training_data
from leanconv.prune3d.block_importance import block_importance
from leanconv.cost.latency_table import LatencyModel
from leanconv.prune3d.blocks import BlockInfo, find_residual_blocks, prune_blocks
from leanconv.prune3d.latency import (latency_ratio, origin_latency, prune_width_latency, reference_call, timed_ratio,
                                     width_of)
from leanconv.prune3d.resolution import MIN_SIDE, resolution_ratio_to_side, set_resolution
from leanconv.train import evaluate, finetune
from leanconv.util.model_io import check_trainable

__all__ = [
    "StepSettings",
    "Origin",
    "Realised",
    "load_origin",
    "bypass_blocks",
    "prune_width",
    "cost_ratio",
    "realise",
    "brief_finetune",
    "val_accuracy",
    "side_of",
    "measure_point",
    "min_side",
]

WIDTH_SKIP = 0.99  # a width share above this is "no width pruning" (inside the 2% budget tolerance)


@dataclass(frozen=True)
class StepSettings:
    """How one pruning step is done and briefly fine-tuned (plain values: sent to workers).
    Built from a checked :class:`~leanconv.runs.prune3d.Prune3dConfig` (its ``finetune_lr`` is
    ``lr`` here; the names are part of the samples' settings hash, so they stay)."""

    data: str  # dataset name as load_dataset accepts it (e.g. "fashion-mnist", "synthetic")
    data_dir: str | None = None
    method: str = "hap"  # channel criterion for the width step
    normalize: str = "mean"  # its score scaling (prune_to_budget); part of the samples' settings hash
    score_images: int = 512  # validation images for block and channel scores
    probes: int = 32  # cap on Hutchinson probes (hap)
    hessian: str = HAP_ESTIMATOR  # hap's curvature estimator (in the settings hash only when another)
    reconstruct_images: int = 0  # refit after each width cut on N training images (in the hash only when > 0)
    min_per_stage: int = 1  # residual blocks each stage keeps at least
    epochs: int = 1  # brief fine-tuning after each step (0: none)
    images: int | None = 2000  # training images per brief fine-tuning epoch (None: all)
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0
    constructor: str | None = None  # the user constructor the checkpoint was built from (imported by workers)
    input_shape: list[int] | None = None  # for a checkpoint that records none
    # a latency budget (prune3d/latency.py): runtime, threads, batch and the unpruned model's
    # measured ms (reference_ms); None: a MACs budget
    latency: dict | None = None


@dataclass
class Origin:
    """The trained model a point is realised from, with what every step needs to know."""

    model: nn.Module
    data: DatasetSplits
    shape: tuple[int, int, int]  # original input shape (C, H, W)
    blocks: list[BlockInfo]  # removable blocks of the original model
    macs: int  # counted MACs of the original model (one image)
    params: int
    min_keep: int  # fewest blocks prune_blocks may keep (stage floors)
    settings: StepSettings
    latency: LatencyModel | None = None  # a latency budget's calibrated table (None: MACs)
    _batches: dict[int, list] = field(default_factory=dict, repr=False)
    _reference: Any = field(default=None, repr=False)  # the unpruned model prepared on the runtime (timed points)

    @property
    def timed(self) -> bool:
        """Whether a point's latency is measured (timed beside the unpruned model), not predicted."""
        return self.latency is not None and bool((self.settings.latency or {}).get("timed"))

    def timed_ratio(self, model: nn.Module) -> float:
        """``model`` timed side by side with the unpruned model (prepared once)."""
        if self._reference is None:
            self._reference = reference_call(self.model, self.shape, self.settings.latency)
        return timed_ratio(self._reference, self.shape, model, self.settings.latency)

    @property
    def side(self) -> int:
        return self.shape[-1]

    def batches(self, side: int) -> list:
        """Validation scoring batches at input ``side`` (cached)."""
        if side not in self._batches:
            res = None if side == self.data.image_size else side
            self._batches[side] = self.data.scoring_batches(self.settings.score_images, self.settings.batch_size, res)
        return self._batches[side]


def load_origin(ckpt: str, settings: StepSettings) -> Origin:
    """Load the trained checkpoint and its data, find the removable blocks, count MACs."""
    model = checkpoint.load(ckpt, constructor=settings.constructor)
    check_trainable(model, ckpt)
    data = load_dataset(settings.data, settings.data_dir)
    if settings.input_shape is not None:
        model.leanconv_meta = {**model.leanconv_meta, "input_shape": list(settings.input_shape)}
    shape = tuple(int(s) for s in model.leanconv_meta.get("input_shape") or ())
    if len(shape) != 3:
        raise LeanconvError(f"{ckpt} records no input shape (C, H, W); pass --input-shape C,H,W")
    model.eval()
    blocks = find_residual_blocks(model, torch.zeros(2, *shape))
    stages: dict[str, int] = {}
    for b in blocks:
        stages[b.stage] = stages.get(b.stage, 0) + 1
    cost = count(model, shape)
    min_keep = sum(min(settings.min_per_stage, n) for n in stages.values())
    latency = None if settings.latency is None else origin_latency(model, shape, settings.latency)
    return Origin(model, data, shape, blocks, cost.macs, cost.params, min_keep, settings,  # type: ignore[arg-type]
                  latency)


def side_of(model: nn.Module) -> int:
    """The input side the model records."""
    return int(model.leanconv_meta["input_shape"][-1])


def _shape(model: nn.Module) -> tuple[int, int, int]:
    return tuple(int(s) for s in model.leanconv_meta["input_shape"])  # type: ignore[return-value]


def bypass_blocks(model: nn.Module, origin: Origin, keep: int) -> list[str]:
    """Depth step: bypass the least important (``"loss"``) blocks until ``keep`` remain."""
    if not origin.blocks:
        if keep == 0:
            return []
        raise LeanconvError("the model has no removable residual blocks; depth pruning does not apply")
    if not origin.min_keep <= keep <= len(origin.blocks):
        raise LeanconvError(f"cannot keep {keep} blocks: the depth range is {origin.min_keep}..{len(origin.blocks)}")
    importance = block_importance(model, origin.blocks, origin.batches(side_of(model)), "loss")
    return prune_blocks(model, origin.blocks, importance, keep, min_per_stage=origin.settings.min_per_stage)


def cost_ratio(model: nn.Module, origin: Origin) -> float:
    """What the budget counts, over the unpruned model's: predicted latency at the model's own
    side with a latency budget, else counted MACs (one image at the original side)."""
    if origin.latency is not None:
        return latency_ratio(origin.latency, model)
    return count(model, origin.shape).macs / origin.macs


def prune_width(model: nn.Module, origin: Origin, share: float) -> None:
    """Width step: remove channels until the model keeps ``share`` of its current MACs (with a
    latency budget: of its predicted latency, on the runtime's staircase), then refit the layers
    that lost input channels on ``settings.reconstruct_images`` training images at the model's
    side (:mod:`leanconv.width.reconstruct`; 0 = as cut)."""
    if share > WIDTH_SKIP:
        return
    settings, shape = origin.settings, _shape(model)
    before = copy.deepcopy(model) if settings.reconstruct_images else None
    if origin.latency is not None:
        removed = prune_width_latency(model, origin.latency, settings, origin.batches(shape[-1]), share)
    else:
        data = ScoringData(origin.batches(shape[-1]), extra={"input_shape": shape})
        model.eval()
        criterion = run_criterion(settings.method, probes=settings.probes, seed=settings.seed,
                                  estimator=settings.hessian)
        removed = prune_to_budget(model, criterion, torch.zeros(1, *shape), target=share, kind="macs",
                                  input_shape=shape, data=data, normalize=settings.normalize).removed
    if before is not None and removed:
        reconstruct_on_training_data(before, model, removed, origin.data, torch.zeros(1, *shape),
                                     images=settings.reconstruct_images, batch_size=settings.batch_size,
                                     resolution=_resolution(origin.data, shape[-1]), seed=settings.seed)


@dataclass(frozen=True)
class Realised:
    """A point as built: ratios ``(d, w, r)`` as realised, the block count, side and counted cost."""

    d: float
    w: float
    r: float
    keep: int
    side: int
    macs: int
    params: int
    latency: float | None = None  # latency over the unpruned model's, timed or predicted (a latency budget only)
    table_latency: float | None = None  # the latency table's prediction of that ratio

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def cost(self) -> float:
        """What the budget counts: the latency ratio with a latency budget, else MACs."""
        return float(self.macs if self.latency is None else self.latency)


def measure_point(model: nn.Module, origin: Origin, w: float) -> Realised:
    """Counted cost of ``model`` and its realised ratios; ``w`` is supplied by the caller."""
    shape = _shape(model)
    cost = count(model, shape)
    alive = [b for b in origin.blocks if not isinstance(model.get_submodule(b.path), nn.Identity)]
    d = len(alive) / len(origin.blocks) if origin.blocks else 1.0
    table = None if origin.latency is None else latency_ratio(origin.latency, model)
    latency = (1.0 if model is origin.model else origin.timed_ratio(model)) if origin.timed else table
    return Realised(d, w, shape[-1] / origin.side, len(alive), shape[-1], cost.macs, cost.params, latency, table)


def realise(origin: Origin, d: float, w: float, r: float) -> tuple[nn.Module, Realised]:
    """Build ``(d, w, r)`` from a copy of the trained model: depth, then width, then resolution
    (``d = 0`` bypasses every removable block the stage floors allow to go)."""
    if not (0 <= d <= 1 and 0 < w <= 1 and 0 < r <= 1):
        raise LeanconvError(f"need d in [0, 1] and w, r in (0, 1], got d={d}, w={w}, r={r}")
    model = copy.deepcopy(origin.model)
    n = len(origin.blocks)
    bypass_blocks(model, origin, math.floor(d * n + 0.5) if n else 0)
    side = resolution_ratio_to_side(r, origin.side)
    if origin.latency is not None:  # width is cut at the side it will run at (prune3d/latency.py)
        if side != origin.side:
            set_resolution(model, side)
        before = latency_ratio(origin.latency, model)
        prune_width(model, origin, w * w)
        point = measure_point(model, origin, 1.0)  # predicts the pruned model's latency once
        return model, replace(point, w=width_of(before, point.table_latency))
    before = count(model, origin.shape).macs
    prune_width(model, origin, w * w)
    after = count(model, origin.shape).macs
    if side != origin.side:
        set_resolution(model, side)
    return model, measure_point(model, origin, math.sqrt(after / before))


def _resolution(data: DatasetSplits, side: int) -> int | None:
    return None if side == data.image_size else side


def brief_finetune(model: nn.Module, data: DatasetSplits, settings: StepSettings, *, epochs: int | None = None,
                   images: int | None | str = "settings") -> None:
    """Fine-tune in place with the shared loop at the model's side (``settings.epochs`` on the
    first ``settings.images`` training images unless given), then re-estimate BatchNorm."""
    epochs = settings.epochs if epochs is None else epochs
    images = settings.images if images == "settings" else images
    if epochs <= 0:
        return
    finetune(model, data, epochs=epochs, lr=settings.lr, seed=settings.seed, batch_size=settings.batch_size,
             resolution=_resolution(data, side_of(model)), images=images)
    model.eval()


def val_accuracy(model: nn.Module, data: DatasetSplits) -> float:
    """Top-1 accuracy (%) on the validation split at the model's side."""
    return evaluate(model, data.loader("val", 256, resolution=_resolution(data, side_of(model))))["accuracy"]


def min_side(origin: Origin, r_min: float) -> int:
    """The smallest side the search may use: ``r_min`` of the original, at least 8."""
    return max(MIN_SIDE, resolution_ratio_to_side(r_min, origin.side))
