"""Three-dimensional pruning, one run end to end: samples -> predictor -> budgeted optimum -> model.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021 (methods.md Sec. 1). What ``leanconv prune3d`` (and ``compare``'s ``3d`` entries)
run; the method's parts are in :mod:`leanconv.prune3d`:

1. check that the budget is reachable inside the search box (fewest blocks, ``w_min``,
   ``r_min``) before any work (:func:`~leanconv.prune3d.search.check_budget`);
2. collect samples ``(d, w, r, validation accuracy)`` by iterative one-dimensional pruning
   plus a few mixed points (:mod:`leanconv.prune3d.samples`), on any executor, kept in
   ``OUT/samples.jsonl`` (resumable). With ``clip_box`` (the default) the width and
   resolution chains stop a little below the level that alone meets the budget
   (:func:`~leanconv.prune3d.search.sampling_floors`);
3. fit the accuracy predictor and calibrate the MACs model on the samples' counted MACs;
4. maximise the predicted accuracy under ``MACs <= target * MACs_0``, realise the choice and
   re-solve while the count misses (:func:`~leanconv.prune3d.search.choose`);
5. fine-tune the realised model at its resolution, re-estimate BatchNorm, evaluate (test
   split for the report only) and measure latency (:mod:`leanconv.runs.record`).

MACs are multiply-accumulates for one image (FLOPs = 2 x MACs: the same ratios).
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanconv import checkpoint
from leanconv.errors import LeanconvError
from leanconv.importance import criterion_names
from leanconv.prune3d.executors import LocalExecutor
from leanconv.width.budget import check_reachable
from leanconv.prune3d.realise import Origin, StepSettings, brief_finetune, load_origin, val_accuracy
from leanconv.prune3d.samples import SampleStore, collect_samples, plan_tasks
from leanconv.prune3d.search import check_budget, choose, fit_samples, sampling_floors
from leanconv.runs.config import (RunConfig, batch_size, finetune_epochs, finetune_lr, latency_repeats, probes,
                                  reproducing_command, runtime, score_images, seed, setting, target, train_subset)
from leanconv.runs.record import Record, Result, add_latency, measure, time_pair
from leanconv.runs.source import Source
from leanconv.util import checks
from leanconv.util.progress import Progress, Stage, quiet

__all__ = ["Prune3dConfig", "run_prune3d"]


def _whole(low: int):
    return lambda v, n: checks.whole(v, n, at_least=low)


@dataclass(frozen=True)
class Prune3dConfig(RunConfig):
    """Settings of one three-dimensional pruning run (``leanconv prune3d``)."""

    command = "prune3d"

    target: float = target(0.33)
    samples: int = setting(16, "--samples", check=_whole(4), always=True, metavar="N",
                           help="samples to collect, the unpruned point included (at least 4)")
    mixed: int | None = setting(None, "--mixed", check=lambda v, n: v if v is None else checks.whole(v, n, at_least=0),
                                metavar="M", help="of which mixed (d, w, r) points (default: a quarter of the rest)")
    method: str = setting("hap", "--method", check=lambda v, n: checks.one_of(v, n, criterion_names()),
                          choices=criterion_names, help="channel criterion of the width steps")
    normalize: str = setting("mean", "--normalize", check=lambda v, n: checks.one_of(v, n, ("mean", "none")),
                             choices=("mean", "none"), help="score scaling of the width steps (as leanconv prune)")
    sample_epochs: int = setting(1, "--sample-epochs", check=_whole(0), metavar="E",
                                 help="brief fine-tuning epochs after each sampling step")
    sample_images: int | None = setting(2000, "--sample-images",
                                        check=lambda v, n: v if v is None else checks.whole(v, n, at_least=1),
                                        metavar="N", help="training images per brief fine-tuning epoch")
    finetune_epochs: int = finetune_epochs(3, "fine-tuning epochs of the chosen model")
    finetune_lr: float = finetune_lr(aliases=("--lr",), help="learning rate of every fine-tuning, the samples' "
                                     "brief ones included (cosine from it)")
    train_subset: int | None = train_subset(help="fine-tune the chosen model on the first N training images only "
                                                 "(default: all; the samples use --sample-images)")
    batch_size: int = batch_size()
    score_images: int = score_images()
    probes: int = probes(32)
    w_min: float = setting(0.4, "--w-min", check=lambda v, n: checks.fraction(v, n),
                           help="smallest width in the search box")
    r_min: float = setting(0.5, "--r-min", check=lambda v, n: checks.number(v, n, above=0, at_most=1),
                           help="smallest resolution ratio (and a side of at least 8)")
    min_blocks_per_stage: int = setting(1, "--min-blocks-per-stage", check=_whole(1), metavar="N",
                                        help="residual blocks each stage keeps")
    clip_box: bool = setting(True, "--full-box", help="sample width and resolution down to --w-min/--r-min "
                             "(default: only to just below the level that alone meets the budget)")
    monotone: bool = setting(True)  # prefer predictors non-decreasing in d, w, r (falls back if none)
    holdout_train: int = setting(10, check=_whole(3))  # training samples of the full vs low-rank held-out check
    grid: int = setting(101, check=_whole(2))  # width grid of the optimum
    seed: int = seed()
    latency_repeats: int = latency_repeats()
    runtime: str = runtime()

    def check(self) -> None:
        if self.mixed is not None and self.mixed > self.samples - 1:
            raise LeanconvError(f"--mixed must be at most --samples - 1 ({self.samples - 1}): the unpruned point is "
                                f"one of the samples; got {self.mixed}")

    def step_settings(self, data: str, data_dir: str | None = None, constructor: str | None = None,
                      input_shape: tuple[int, ...] | None = None) -> StepSettings:
        """How each sampling step prunes and briefly fine-tunes (plain values, sent to workers)."""
        return StepSettings(data=data, data_dir=data_dir, method=self.method, normalize=self.normalize,
                            score_images=self.score_images, probes=self.probes,
                            min_per_stage=self.min_blocks_per_stage, epochs=self.sample_epochs,
                            images=self.sample_images, lr=self.finetune_lr, batch_size=self.batch_size, seed=self.seed,
                            constructor=constructor, input_shape=None if input_shape is None else list(input_shape))

    def run(self, source: Source, **kwargs: Any) -> Result:
        return run_prune3d(self, source, **kwargs)


def _finish(origin: Origin, model: nn.Module, config: Prune3dConfig, say: Stage) -> dict:
    """Protocol-matched check on a copy, then the final fine-tune; validation accuracies."""
    check = copy.deepcopy(model)
    brief_finetune(check, origin.data, origin.settings)
    protocol = val_accuracy(check, origin.data)
    del check
    say(f"fine-tuning the chosen model for {config.finetune_epochs} epochs")
    brief_finetune(model, origin.data, origin.settings, epochs=config.finetune_epochs, images=config.train_subset)
    return {"val_protocol": protocol, "val_after_finetune": val_accuracy(model, origin.data)}


def _test_loader(origin: Origin, side: int):
    return origin.data.loader("test", 256, resolution=None if side == origin.data.image_size else side)


def _checkpoint_of(source: Source, out: Path) -> Path:
    """The file the sample tasks reload the trained model from (a model in memory is saved first)."""
    if source.checkpoint is not None:
        return source.checkpoint
    path = out / "origin.safetensors"
    checkpoint.save(source.model, path, constructor=source.constructor)
    return path


def run_prune3d(config: Prune3dConfig, source: Source, *, out: str | Path | None = None, executor: Any = None,
                progress: Progress | None = None, stage: Stage | None = None, measured: bool = True) -> Result:
    """Prune ``source``'s model in three dimensions (module docstring). Samples are kept in
    ``out/samples.jsonl`` (a re-run resumes them; without ``out``, in a temporary folder);
    ``executor`` runs the sample tasks (default: in this process). With ``measured`` False no
    latency is measured (a caller that measures the result itself). Returns the fine-tuned
    model and its record."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="leanconv-prune3d-") as work:
            result = _run(config, source, Path(work), executor, progress, stage or quiet, measured)
        result.record.command = None
        return result
    return _run(config, source, Path(out), executor, progress, stage or quiet, measured)


def _run(config: Prune3dConfig, source: Source, out: Path, executor: Any, progress: Progress | None,
         say: Stage, measured: bool) -> Result:
    t0 = time.perf_counter()
    ckpt = _checkpoint_of(source, out)
    origin = load_origin(str(ckpt), config.step_settings(source.data.name, source.data_dir, source.constructor,
                                                         source.input_shape))
    box = check_budget(origin, config.target, w_min=config.w_min, r_min=config.r_min,
                       min_per_stage=config.min_blocks_per_stage)  # an impossible budget fails here, before any work
    example = torch.zeros(1, *origin.shape, dtype=next(origin.model.parameters()).dtype)
    check_reachable(origin.model, example, target=0.999, input_shape=origin.shape)  # any prunable channel? now
    budget = config.target * origin.macs
    w_floor, side_floor = sampling_floors(box, origin.side, config.target, config.clip_box)
    box.update(w_sampled_min=w_floor, side_sampled_min=side_floor)
    tasks = plan_tasks(config.samples, n_blocks=len(origin.blocks), min_keep=origin.min_keep, side=origin.side,
                       min_side=side_floor, w_min=w_floor, target=config.target, mixed=config.mixed)
    say(f"collecting {config.samples} samples ({len(tasks)} tasks)")
    samples = collect_samples(ckpt, origin.settings, tasks, SampleStore(out / "samples.jsonl"),
                              executor or LocalExecutor(0), progress)
    t_samples = time.perf_counter()
    say("fitting the accuracy predictor and the MACs model")
    fit = fit_samples(samples, origin.macs, monotone=config.monotone, seed=config.seed,
                      holdout_train=config.holdout_train)
    say(f"maximising predicted accuracy under {config.target:g} of the MACs")
    result, model, point, curve = choose(origin, fit, budget, r_min=config.r_min, grid=config.grid)
    accuracy = _finish(origin, model, config, say)
    say("measuring")
    after_shape = tuple(model.leanconv_meta["input_shape"])
    before = measure(origin.model, origin.shape, _test_loader(origin, origin.side))
    after = measure(model, after_shape, _test_loader(origin, point.side))
    timing = None
    if measured:
        timing = time_pair(origin.model, model, (origin.shape, after_shape), runtime=config.runtime, threads=1,
                           repeats=config.latency_repeats)
        add_latency(before, after, timing)
    seconds = {"samples": t_samples - t0, "total": time.perf_counter() - t0,
               "sampling_compute": sum(s["seconds"] for s in samples)}
    details = _details(origin, config, box, samples, fit, result, point, curve, accuracy, before, after)
    command = reproducing_command(config, source, out)
    record = Record("prune3d", config.to_dict(), command, source.describe(), list(origin.shape), before, after,
                    seconds, details, timing)
    model.leanconv_meta = {**model.leanconv_meta, "test": {"accuracy": after["test_accuracy"]},
                           "prune3d": {"target": config.target, "choice": details["choice"],
                                       "val_accuracy": accuracy["val_after_finetune"]}}
    return Result(model, record)


def _details(origin, config, box, samples, fit, result, point, curve, accuracy, before, after) -> dict:
    choice = result.choice
    return {
        "method": "prune3d", "settings": asdict(origin.settings),
        "output_input_shape": [origin.shape[0], point.side, point.side],
        "budget": {"target": config.target, "macs0": origin.macs, "budget_macs": config.target * origin.macs},
        "search_box": box, "samples": samples,
        "predictor": fit["predictor"], "holdout": fit["holdout"], "cost_model": fit["cost_model"],
        "choice": {**choice.to_dict(), "realised": point.to_dict(), "counted_macs": result.counted_macs,
                   "within_budget": result.counted_macs <= config.target * origin.macs},
        "resolve_trail": list(result.trail), "budget_curve": curve["curve"], "fill": curve["fill"],
        "accuracy": {"predicted_val": choice.predicted_accuracy, "measured_val_protocol": accuracy["val_protocol"],
                     "val_after_finetune": accuracy["val_after_finetune"],
                     "test_before": before["test_accuracy"], "test_after": after["test_accuracy"]},
        "finetune": {"epochs": config.finetune_epochs, "lr": config.finetune_lr,
                     "images": len(origin.data.train) if config.train_subset is None
                     else min(config.train_subset, len(origin.data.train))},
    }
