"""Knowledge distillation: fine-tune a pruned model toward the unpruned model's soft outputs.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015). With the
student's logits ``s``, the teacher's ``t``, labels ``y``, temperature ``T`` and weight ``A``
(both the paper's), the loss of a batch is

    (1 - A) * CE(s, y) + A * T^2 * KL(softmax(t / T) || softmax(s / T))

with the KL divergence averaged over the batch (``T^2`` keeps the soft term's gradients on the
scale of the hard term's as ``T`` changes: Hinton et al., section 2). The teacher runs in eval
mode without gradients on the very batch the student sees (same augmentation), so a
distilled run is as reproducible per seed as a plain one. :class:`Distillation` is a
:class:`~leanconv.train.loop.Loss` for the shared loop (``fit(..., loss=...)``,
``finetune(..., loss=...)``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.util import checks
from leanconv.util.model_io import model_dtype, run_forward, to_model
from leanconv.util.modes import eval_mode

__all__ = ["distillation_loss", "Distillation", "DEFAULT_TEMPERATURE", "DEFAULT_WEIGHT"]

DEFAULT_TEMPERATURE = 4.0  # Hinton et al. used 2-20; 4 is the common choice for CIFAR-sized nets
DEFAULT_WEIGHT = 0.5  # the share A of the soft (teacher) term


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float = DEFAULT_TEMPERATURE, weight: float = DEFAULT_WEIGHT) -> torch.Tensor:
    """``(1 - weight) * CE(student, targets) + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    both terms means over the batch (module docstring); ``student`` and ``teacher`` are logits
    ``[N, K]``. The teacher's logits get no gradient."""
    checks.number(temperature, "temperature", above=0)
    checks.number(weight, "weight", at_least=0, at_most=1)
    _check_pair(student, teacher)
    hard = F.cross_entropy(student, targets)
    if weight == 0:
        return hard
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher.detach().to(student.dtype) / t, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * t * t * soft


def _check_pair(student: Any, teacher: Any) -> None:
    """One line when the teacher's outputs cannot be matched with the student's."""
    for name, out in (("student", student), ("teacher", teacher)):
        if not torch.is_tensor(out) or out.dim() != 2:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise LeanconvError(f"distillation needs class logits [N, K] from the {name}, got {shape}; distil "
                                "only classifiers (or drop --distill)")
    if student.shape != teacher.shape:
        raise LeanconvError(f"the distillation teacher's outputs have shape {tuple(teacher.shape)} but the "
                            f"student's {tuple(student.shape)}: the teacher must predict the same "
                            f"{student.shape[-1]} classes; distil from the unpruned model of the same task, or drop "
                            "--distill")


class Distillation:
    """The distillation loss with a fixed ``teacher`` (a :class:`~leanconv.train.loop.Loss`).

    The teacher is put in eval mode with gradients off and moved to the batch's device (and
    memory format) on first use; give it a copy you do not need to train."""

    def __init__(self, teacher: nn.Module, *, temperature: float = DEFAULT_TEMPERATURE,
                 weight: float = DEFAULT_WEIGHT) -> None:
        if not isinstance(teacher, nn.Module):
            raise LeanconvError(f"the distillation teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        self.temperature = checks.number(temperature, "--distill-temperature", above=0)
        self.weight = checks.number(weight, "--distill-weight", at_least=0, at_most=1)
        self.teacher = teacher.eval().requires_grad_(False)
        self._placed: tuple | None = None

    def describe(self) -> dict[str, Any]:
        return {"distill": {"temperature": self.temperature, "weight": self.weight}}

    def check(self, student: nn.Module, example: torch.Tensor) -> None:
        """Refuse (one line) a teacher whose outputs on ``example`` (a batch) differ in shape
        from ``student``'s: what a run checks before any training. Both models are unchanged."""
        with torch.no_grad(), eval_mode(student), eval_mode(self.teacher):
            _check_pair(run_forward(student, to_model(example, student)),
                        run_forward(self.teacher, to_model(example, self.teacher)))

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the batch ``x`` (eval mode, no gradient)."""
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        place = (x.device, channels_last)
        if self._placed != place:
            self.teacher.to(device=x.device)
            if channels_last:
                self.teacher.to(memory_format=torch.channels_last)
            self._placed = place
        self.teacher.eval()
        with torch.no_grad():
            return run_forward(self.teacher, x.to(model_dtype(self.teacher)))

    def __call__(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.weight == 0:  # plain cross-entropy: the teacher need not run
            return F.cross_entropy(out, y)
        return distillation_loss(out, self.teacher_logits(x), y, temperature=self.temperature, weight=self.weight)
