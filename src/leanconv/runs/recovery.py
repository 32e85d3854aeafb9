"""Recovering accuracy in a width-pruning run: reconstruction, distillation and sparsity-regularised training.

The three options of ``leanconv prune`` (:class:`~leanconv.runs.prune.PruneConfig`) that help
a cut model recover, and the steps they add to :func:`~leanconv.runs.prune.run_prune` (the
reconstruction also to every width cut of ``prune3d``):

* ``--regularize-epochs N`` (``--regularize-strength L``): before any scoring, N epochs of
  group-lasso training on the channel groups the engine is about to cut
  (:mod:`leanconv.train.regularize`), at ``--finetune-lr`` on the fine-tuning images; the record
  gives the time, the penalty before and after and, when the run measures, the test accuracy
  after (BatchNorm statistics re-estimated);
* ``--distill`` (``--distill-temperature T``, ``--distill-weight A``): every fine-tuning, in
  every round of ``--steps``, distils from a fresh copy of the unpruned model
  (:mod:`leanconv.train.distill`); a teacher whose outputs cannot be matched with the
  student's is refused before any work;
* ``--reconstruct-images N`` (default 512, 0 = off): right after the cut, every layer that
  lost input channels is refitted by least squares to reproduce the unpruned layer's kept
  outputs on N un-augmented training images (:mod:`leanconv.width.reconstruct`), before
  BatchNorm statistics are re-estimated and the cut is judged; the record gives each layer's
  unexplained share before and after.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.graph.groups import channel_groups
from leanconv.runs.config import setting
from leanconv.runs.source import Source
from leanconv.train import evaluate
from leanconv.train.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, Distillation
from leanconv.train.regularize import DEFAULT_STRENGTH, regularize
from leanconv.util import checks
from leanconv.util.model_io import to_model
from leanconv.util.progress import Progress, Stage, quiet
from leanconv.width.reconstruct import reconstruct_on_training_data

__all__ = ["distill", "distill_temperature", "distill_weight", "regularize_epochs", "regularize_strength",
           "reconstruct_images", "check_settings", "teacher_loss", "distillation_record", "regularize_before_cut",
           "reconstruct_after_cut"]

RECONSTRUCT_IMAGES = 512


# ---------------------------------------------------------------- the settings


def distill(where: str = "") -> Any:
    """``--distill``; ``where`` ends its help (which models it applies to)."""
    return setting(False, "--distill", help="fine-tune with knowledge distillation from the unpruned model "
                   "(Hinton et al. 2015): loss (1-A)*CE + A*T^2*KL(teacher || student) on softened outputs; needs "
                   f"--finetune-epochs{where}")


def distill_temperature() -> Any:
    return setting(DEFAULT_TEMPERATURE, "--distill-temperature",
                   check=lambda v, n: checks.number(v, n, above=0), metavar="T",
                   help="with --distill: softmax temperature T of the teacher and student outputs (higher = softer)")


def distill_weight() -> Any:
    return setting(DEFAULT_WEIGHT, "--distill-weight",
                   check=lambda v, n: checks.number(v, n, at_least=0, at_most=1), metavar="A",
                   help="with --distill: share A of the distillation term, 0 to 1 (0 = plain cross-entropy, "
                   "1 = teacher only)")


def regularize_epochs() -> Any:
    return setting(0, "--regularize-epochs", check=lambda v, n: checks.whole(v, n, at_least=0), metavar="N",
                   help="before scoring, train N epochs (at --finetune-lr) with a group-lasso penalty on the channel "
                   "groups to be cut, so that channels the data does not need shrink toward zero; 0 = off")


def regularize_strength() -> Any:
    return setting(DEFAULT_STRENGTH, "--regularize-strength", check=lambda v, n: checks.number(v, n, above=0),
                   metavar="L", help="with --regularize-epochs: weight L of the penalty (the sum of every "
                   "channel's L2 norm over its group's layers) against the cross-entropy; each step pulls every "
                   "channel's norm toward zero by about lr*L, so with fewer steps (a --train-subset) raise it")


def reconstruct_images() -> Any:
    return setting(RECONSTRUCT_IMAGES, "--reconstruct-images", check=lambda v, n: checks.whole(v, n, at_least=0),
                   metavar="N", help="right after the cut, refit every layer that lost input channels by least "
                   "squares so that its kept outputs match the unpruned model's on N un-augmented training images "
                   "(ResNet-20 at half the MACs: accuracy before fine-tuning 79.7 -> 92.0); 0 = keep weights as cut")


def check_settings(config: Any) -> None:
    """Refuse, in one line, recovery settings that would do nothing."""
    if not config.distill:
        for flag, value, default in (("--distill-temperature", config.distill_temperature, DEFAULT_TEMPERATURE),
                                     ("--distill-weight", config.distill_weight, DEFAULT_WEIGHT)):
            if value != default:
                raise LeanconvError(f"{flag} sets the distillation of --distill: add --distill or drop {flag}")
    elif config.finetune_epochs == 0:
        raise LeanconvError("--distill acts while fine-tuning: give --finetune-epochs N (N >= 1) or drop --distill")
    if not getattr(config, "regularize_epochs", 0) and \
            getattr(config, "regularize_strength", DEFAULT_STRENGTH) != DEFAULT_STRENGTH:
        raise LeanconvError("--regularize-strength sets the penalty of --regularize-epochs: give --regularize-epochs "
                            "N (N >= 1) or drop --regularize-strength")


# ---------------------------------------------------------------- the steps


def teacher_loss(config: Any, source: Source, student: nn.Module, example: torch.Tensor) -> Distillation | None:
    """The distillation loss with a fresh copy of ``source``'s model as teacher (None without
    ``config.distill``), checked against ``student`` on ``example`` before any work."""
    if not config.distill:
        return None
    loss = Distillation(source.fresh(), temperature=config.distill_temperature, weight=config.distill_weight)
    loss.check(student, example)
    return loss


def distillation_record(config: Any, teacher: str = "the unpruned model") -> dict[str, Any] | None:
    """The distillation settings a run's record states (None without ``config.distill``)."""
    if not config.distill:
        return None
    return {"teacher": teacher, "temperature": config.distill_temperature,
            "weight": config.distill_weight, "epochs": config.finetune_epochs,
            "loss": "(1 - weight) * CE + weight * temperature^2 * KL(teacher || student)"}


def regularize_before_cut(config: Any, model: nn.Module, data, example: torch.Tensor, resolution: int | None, *,
                          test=None, progress: Progress | None = None, stage: Stage | None = None
                          ) -> dict[str, Any] | None:
    """Train ``model`` in place with the group lasso for ``config.regularize_epochs`` (module
    docstring); the record of what it did, or None when off."""
    if not config.regularize_epochs:
        return None
    if data is None:
        raise LeanconvError("--regularize-epochs trains on the training data, and this run has none; give --data "
                            "(data= in Python)")
    (stage or quiet)(f"training {config.regularize_epochs} epochs with a group-lasso penalty "
                     f"(strength {config.regularize_strength:g})")
    groups = channel_groups(model, to_model(example, model), strict=config.strict)  # the groups the engine cuts
    done = regularize(model, data, groups, epochs=config.regularize_epochs, strength=config.regularize_strength,
                      lr=config.finetune_lr, seed=config.seed, batch_size=config.batch_size, resolution=resolution,
                      images=config.train_subset, progress=progress)
    record = done.to_dict()
    if test is not None:
        record["test_accuracy"] = evaluate(model, test)["accuracy"]
    return record


def reconstruct_after_cut(config: Any, original: nn.Module | None, model: nn.Module, removed: dict[str, list[int]],
                          data, example: torch.Tensor, resolution: int | None, *,
                          progress: Progress | None = None, stage: Stage | None = None) -> dict[str, Any] | None:
    """Refit the layers of ``model`` (cut from ``original`` by removing ``removed``: group root
    -> group channels) that lost input channels (module docstring); the record of what it
    did, or None when off (``original`` None, ``config.reconstruct_images`` 0 or no training data)."""
    if original is None or not config.reconstruct_images or data is None or not getattr(data, "has", bool)("train"):
        return None  # (the Python API's data may be validation batches only)
    (stage or quiet)(f"refitting the layers that lost input channels on "
                     f"{min(config.reconstruct_images, len(data.train))} training images")
    return reconstruct_on_training_data(original, model, removed, data, example, images=config.reconstruct_images,
                                        batch_size=config.batch_size, resolution=resolution, seed=config.seed,
                                        strict=config.strict, progress=progress).to_dict()
