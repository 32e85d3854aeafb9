"""One pruning run, end to end: score, remove to budget, fine-tune, recalibrate, measure.

``run_pruning`` is what ``leanconv prune`` (and ``leanconv compare``) call. It scores channel
groups with any registered criterion on validation batches (never the test split), removes
channels physically until the counted MACs or params land within 2% of the target
(optionally in ``steps`` rounds with fine-tuning between them, optionally implanting the
most sensitive pruned channels), fine-tunes with the shared training loop, re-estimates
BatchNorm statistics on training data, and records accuracy, counted cost and measured
latency before and after.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from leanconv.cost import count, measure_fastest_layout
from leanconv.data.splits import DatasetSplits
from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData, create_criterion
from leanconv.prune.budget import iterative_prune, prune_to_budget
from leanconv.prune.implant_fit import IMPLANT_INITS
from leanconv.train import evaluate, finetune
from leanconv.util.progress import Progress

__all__ = ["PruneConfig", "run_pruning", "measure", "scoring_batches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning run (the CLI's ``leanconv prune`` options)."""

    method: str = "hap"
    target: float = 0.5  # fraction of the original cost to keep
    kind: str = "macs"  # "macs" (= FLOPs / 2, same ratio) or "params"
    implant: float = 0.0  # HAP Neural Implant: share of pruned channels implanted
    implant_init: str = "zero"  # "zero" (HAP) or "fit" (least squares on the scoring batches)
    round_to: int | None = None
    steps: int = 1  # >1: prune a share, fine-tune, repeat
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    batch_size: int = 128
    score_images: int = 512  # validation images used for scoring
    probes: int = 64  # cap on Hutchinson probes (hap)
    train_subset: int | None = None  # fine-tune on this many training images only (quick runs)
    # score scaling before the global ranking: "mean" divides each group's scores by their
    # mean (every criterion, hap included: measured better for hap too), "none" keeps them raw
    normalize: str = "mean"
    latency_aware: bool = False  # rank by score per measured ms-per-MAC (prune.latency_weights)
    shrink: bool = False  # hap: rank by traces shrunk toward their layer's mean by their standard errors
    strict: bool = True  # False: keep channels that pass through layers leanconv cannot resize (else an error)
    seed: int = 0
    latency_repeats: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise LeanconvError(f"target must lie strictly between 0 and 1, got {self.target}")
        if self.kind not in ("macs", "params"):
            raise LeanconvError(f"budget kind must be macs or params, got {self.kind!r}")
        if not 0.0 <= self.implant < 1.0:
            raise LeanconvError(f"--implant must lie in [0, 1), got {self.implant}")
        if self.implant_init not in IMPLANT_INITS:
            raise LeanconvError(f"--implant-init must be one of {', '.join(IMPLANT_INITS)}, got {self.implant_init!r}")
        if self.normalize not in ("mean", "none"):
            raise LeanconvError(f"normalize must be mean or none, got {self.normalize!r}")
        if self.steps < 1 or self.finetune_epochs < 0 or self.score_images < 1:
            raise LeanconvError("steps and scoring images must be positive, fine-tuning epochs >= 0")
        if self.probes < 2:
            raise LeanconvError(f"--probes must be at least 2 (a standard error needs two), got {self.probes}")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise LeanconvError(f"--finetune-lr must be a finite number above 0, got {self.finetune_lr}")


def scoring_batches(data: DatasetSplits, n_images: int, batch_size: int, resolution: int | None) -> list:
    """The first ``n_images`` of the validation split, as batches (fixed, never the test split)."""
    loader = data.loader("val", batch_size, resolution=resolution, subset=min(n_images, len(data.val)))
    return list(loader.epoch(0))


def measure(model: nn.Module, shape, test_loader, repeats: int) -> dict[str, Any]:
    """Counted params/MACs (one image), test accuracy, and measured latency at batch 1 and 64
    (each in the model's faster memory layout), and at batch 64 in the deployment form
    (BatchNorm folded into its conv, :mod:`leanconv.deploy.fold`)."""
    metrics = evaluate(model, test_loader)
    latency = {f"batch{b}": measure_fastest_layout(model, shape, b, repeats=repeats, warmup=3).to_dict()
               for b in (1, 64)}
    latency["batch64_bn_folded"] = measure_fastest_layout(model, shape, 64, repeats=repeats, warmup=3,
                                                          fold_bn=True).to_dict()
    return {**_counted(model, shape), "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"],
            "latency_ms": latency}


def _criterion(config: PruneConfig, progress: Progress | None):
    kwargs: dict[str, Any] = {}
    if config.method == "hap":
        kwargs = {"max_probes": config.probes, "min_probes": min(8, config.probes), "seed": config.seed,
                  "progress": progress, "shrink": config.shrink}
    elif config.method == "random":
        kwargs = {"seed": config.seed}
    return create_criterion(config.method, **kwargs)


def _finetune_fn(data, config: PruneConfig, resolution, progress):
    return lambda model, epochs: finetune(model, data, epochs=epochs, lr=config.finetune_lr, seed=config.seed,
                                          batch_size=config.batch_size, resolution=resolution,
                                          images=config.train_subset, progress=progress)


def _counted(model: nn.Module, shape) -> dict[str, Any]:
    """Counted params, MACs and FLOPs of one image."""
    cost = count(model, shape)
    return {"params": cost.params, "macs": cost.macs, "flops": cost.flops}


def _speedup(before: dict, after: dict, batch: str) -> float | None:
    if "latency_ms" not in before:
        return None
    return before["latency_ms"][batch]["median_ms"] / after["latency_ms"][batch]["median_ms"]


def run_pruning(model: nn.Module, data: DatasetSplits, shape: tuple[int, int, int], config: PruneConfig, *,
                resolution: int | None = None, progress: Progress | None = None,
                stage: Callable[[str], None] | None = None, measured: bool = True) -> dict[str, Any]:
    """Prune ``model`` in place per ``config``; returns the JSON-able record. With ``measured``
    False only counted costs are recorded (a caller that measures the result itself, like
    ``compare``, skips the test-set evaluations and latency runs)."""
    say = stage or (lambda text: None)
    t0 = time.perf_counter()
    test = data.loader("test", 256, resolution=resolution)
    criterion = _criterion(config, progress)  # unknown method fails here, before any work
    say("measuring the unpruned model")
    gauge = (lambda m: measure(m, shape, test, config.latency_repeats)) if measured else (lambda m: _counted(m, shape))
    before = gauge(model)
    scoring = ScoringData(scoring_batches(data, config.score_images, config.batch_size, resolution),
                          extra={"input_shape": shape})
    example = torch.randn(1, *shape)
    finetune = _finetune_fn(data, config, resolution, progress)
    options = {"kind": config.kind, "input_shape": shape, "data": scoring, "round_to": config.round_to,
               "normalize": config.normalize, "latency_aware": config.latency_aware,
               "implant_init": config.implant_init, "strict": config.strict}
    say(f"scoring with {config.method} and pruning to {config.target:g} of the {config.kind}")
    pruned = None  # with several rounds, fine-tuning is interleaved with them
    if config.steps == 1:
        results = [prune_to_budget(model, criterion, example, target=config.target, implant=config.implant, **options)]
        pruned = measure_quick(model, shape, test) if measured else None
        say(f"fine-tuning for {config.finetune_epochs} epochs")
        finetune(model, config.finetune_epochs)
    else:
        epochs = _split(config.finetune_epochs, config.steps)
        results = iterative_prune(model, criterion, example, lambda m, s: finetune(m, epochs[s - 1]),
                                  target=config.target, steps=config.steps, implant=config.implant, **options)
    say("measuring the pruned model")
    after = gauge(model)
    return _record(config, shape, before, after, pruned, results, getattr(criterion, "last_traces", None), t0)


def _record(config, shape, before, after, pruned, results, traces, t0) -> dict[str, Any]:
    return {
        "method": config.method, "config": asdict(config), "input_shape": list(shape),
        "before": before, "after": after, "after_prune_before_finetune": pruned,
        "achieved": {"macs": after["macs"] / before["macs"], "params": after["params"] / before["params"]},
        "speedup_batch64": _speedup(before, after, "batch64"), "speedup_batch1": _speedup(before, after, "batch1"),
        "speedup_batch64_bn_folded": _speedup(before, after, "batch64_bn_folded"),
        "mac_reduction": before["macs"] / after["macs"],
        "rounds": [r.to_dict() for r in results],
        "layers": _merge_layers(results),
        "hessian": None if traces is None else {"probes": traces.probes, "converged": traces.converged,
                                                "seconds": traces.seconds, "method": traces.method},
        "seconds": time.perf_counter() - t0,
    }


def measure_quick(model: nn.Module, shape, test_loader) -> dict[str, Any]:
    """Counted cost and test accuracy, no latency (used between pruning and fine-tuning)."""
    return {**_counted(model, shape), "test_accuracy": evaluate(model, test_loader)["accuracy"]}


def _split(total: int, parts: int) -> list[int]:
    """``total`` epochs over ``parts`` rounds, the remainder going to the last rounds: 5, 3 -> [1, 2, 2]."""
    return [total // parts + (1 if i >= parts - total % parts else 0) for i in range(parts)]


def _merge_layers(results) -> dict[str, list[int]]:
    """Channels per layer before the first round and after the last."""
    first, last = results[0].layers, results[-1].layers
    return {name: [first[name][0], last.get(name, first[name])[1]] for name in first}
