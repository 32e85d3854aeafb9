"""The one-call Python API: a plain ``nn.Module`` and the user's own batches in, a model out.

    small = leanconv.prune(model, example_input, data=loader, method="l1", target_latency=0.5)

Each call builds the run's config (so every value is checked as on the command line), wraps
the model and the batches in a :class:`~leanconv.runs.source.Source` and runs the same run
function as the CLI (:mod:`leanconv.runs.prune`, :mod:`leanconv.runs.convert`). The model
given is never changed: the result is a new module, whose ``leanconv_record`` holds the run's
record (the same keys as ``record.json``). ``data`` is any iterable of ``(images, labels)``
batches, a ``torch.utils.data.DataLoader`` included, used as given
(:class:`~leanconv.data.batches.BatchData`): for scoring (``val_data`` when given), for
fine-tuning and BatchNorm re-estimation, and ``test_data`` for accuracy and latency.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from leanconv.cost import profile as _profile
from leanconv.data.batches import BatchData
from leanconv.errors import LeanconvError
from leanconv.importance import create_criterion
from leanconv.runs.convert import ConvertConfig, run_convert
from leanconv.runs.prune import PruneConfig, run_prune
from leanconv.runs.source import Source
from leanconv.train import finetune as _finetune
from leanconv.train.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, Distillation
from leanconv.util.model_io import check_trainable, run_forward
from leanconv.util.modes import eval_mode

__all__ = ["prune", "convert", "finetune", "profile"]


def _settings(config_type: type, given: dict[str, Any], call: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise LeanconvError(f"leanconv.{call} has no setting {', '.join(unknown)}; its settings: "
                            f"{', '.join(sorted(names))}")
    return given


def _example(example_input: Any) -> torch.Tensor:
    if not (torch.is_tensor(example_input) and example_input.is_floating_point() and example_input.dim() == 4):
        raise LeanconvError("example_input must be a float tensor [N, C, H, W] such as torch.randn(1, 3, 32, 32)")
    return example_input


def _classes(model: nn.Module, x: torch.Tensor) -> int | None:
    """The number of logits ``model`` gives one input (None when its output is not [N, K])."""
    with eval_mode(model), torch.no_grad():
        out = run_forward(model, x[:1])
    return int(out.shape[-1]) if torch.is_tensor(out) and out.dim() == 2 else None


def _source(model: nn.Module, example: torch.Tensor, data, val_data, test_data) -> Source:
    if not isinstance(model, nn.Module):
        raise LeanconvError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    given = any(d is not None for d in (data, val_data, test_data))
    batches = (BatchData(data, example, val=val_data, test=test_data, classes=_classes(model, example))
               if given else None)
    source = Source(batches, model=model, input_shape=tuple(int(s) for s in example.shape[1:]))
    return source


def _finish(result) -> nn.Module:
    model = result.model
    model.leanconv_record = result.record.to_dict()
    return model


def prune(model: nn.Module, example_input: torch.Tensor, *, data: Iterable | None = None,
          val_data: Iterable | None = None, test_data: Iterable | None = None, method: str = "hap",
          target_macs: float | None = None, target_params: float | None = None, target_latency: float | None = None,
          **settings: Any) -> nn.Module:
    """A copy of ``model`` with channels removed until it runs in ``target_latency`` of its
    measured latency (on ``runtime``, ``threads`` and ``latency_batch``: ONNX Runtime, 1 and 1
    by default) or keeps ``target_macs`` of its MACs (or ``target_params`` of its parameters),
    ranked by ``method`` (``leanconv.list_criteria()``); ``settings`` are
    :class:`~leanconv.runs.prune.PruneConfig` fields (``finetune_epochs``, ``finetune_lr``,
    ``implant``, ``round_to``, ``probes``, ``score_images``, ``seed``, ``runtime``, ``distill``,
    ``regularize_epochs``, ...). Criteria that score on data (``hap``, ``taylor``), fine-tuning and
    regularisation need ``data``."""
    budgets = {"latency": target_latency, "macs": target_macs, "params": target_params}
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1 or {"target", "kind"} & set(settings):
        raise LeanconvError("give one budget: target_latency=0.5 (a fraction of the measured latency), "
                            "target_macs=0.5 (of the MACs) or target_params=0.5")
    (kind, target), = given.items()
    config = PruneConfig(method=method, target=target, kind=kind, **_settings(PruneConfig, settings, "prune"))
    example = _example(example_input)
    if data is None and val_data is None and (create_criterion(method).needs_data or config.finetune_epochs):
        raise LeanconvError(f"{'method ' + method if create_criterion(method).needs_data else 'fine-tuning'} needs "
                            "data: pass data=<(images, labels) batches>, e.g. a DataLoader")
    if config.finetune_epochs and data is None:
        raise LeanconvError("fine-tuning needs training batches: pass data=")
    if config.regularize_epochs and data is None:
        raise LeanconvError("regularize_epochs trains before the cut and needs training batches: pass data=")
    source = _source(model, example, data, val_data, test_data)
    return _finish(run_prune(config, source, measured=test_data is not None))


def convert(model: nn.Module, example_input: torch.Tensor, *, to: str = "scc", data: Iterable | None = None,
            test_data: Iterable | None = None, **settings: Any) -> nn.Module:
    """A copy of ``model`` with its convs swapped for DW + sliding-channel (``to="scc"``,
    ``groups=G``, ``overlap``) or periodic sparse (``to="psconv"``, ``pattern``) layers drawn
    from ``seed``; with ``finetune_epochs`` (and ``data``) fine-tuned afterwards."""
    config = ConvertConfig(to=to, **_settings(ConvertConfig, settings, "convert"))
    if config.finetune_epochs and data is None:
        raise LeanconvError("fine-tuning needs training batches: pass data=")
    source = _source(model, _example(example_input), data, None, test_data)
    return _finish(run_convert(config, source, measured=test_data is not None))


def finetune(model: nn.Module, data: Iterable, *, epochs: int = 1, lr: float = 0.01, seed: int = 0,
             teacher: nn.Module | None = None, distill_temperature: float = DEFAULT_TEMPERATURE,
             distill_weight: float = DEFAULT_WEIGHT) -> nn.Module:
    """Fine-tune ``model`` in place on ``data`` (SGD with momentum, cosine from ``lr``), then
    re-estimate its BatchNorm statistics on the same batches; returns ``model``. With a
    ``teacher`` (e.g. the model before pruning; it is not changed) the loss is knowledge
    distillation from it (:mod:`leanconv.train.distill`) at ``distill_temperature`` with
    ``distill_weight``; its outputs must match ``model``'s."""
    config = PruneConfig(finetune_epochs=epochs, finetune_lr=lr, seed=seed, distill=teacher is not None,
                         distill_temperature=distill_temperature, distill_weight=distill_weight)  # a run's checks
    check_trainable(model, "the model")
    if not config.finetune_epochs:
        return model
    batches = BatchData(data)
    first = next(iter(batches.loader("train", 1).epoch(0)), None)
    if first is None:
        raise LeanconvError("data holds no batch")
    batches.num_classes = _classes(model, first[0])
    loss = None
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise LeanconvError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        loss = Distillation(copy.deepcopy(teacher), temperature=config.distill_temperature,
                            weight=config.distill_weight)
        loss.check(model, first[0])
    _finetune(model, batches, epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed, loss=loss)
    return model


def profile(model: nn.Module, example_input: torch.Tensor | Sequence[int], **options: Any) -> dict[str, Any]:
    """Counted params, MACs and FLOPs, activation memory and measured latency of ``model`` on
    inputs shaped like ``example_input`` (a tensor, or a shape ``(C, H, W)``); ``options`` as
    :func:`leanconv.cost.profile` (``latency=False`` to count only)."""
    shape = tuple(example_input.shape[1:]) if torch.is_tensor(example_input) else tuple(example_input)
    return _profile(model, shape, **options)
