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

With a latency budget (``kind="latency"``, ``--target-latency R``) step 1 times the unpruned
model on the runtime and calibrates the latency table on it, a point's cost is its latency
ratio (timed, or predicted by the table when tasks run in parallel) and its width is cut on the
runtime's staircase (:mod:`leanconv.prune3d.latency`); step 4 first (when points are timed)
times the unpruned model at every side of the box and scales the fitted latency model by that
profile, then times the
chosen model and two alternatives from the budget boundary side by side with the unpruned one,
keeps the most accurate (predicted) that measures within ``R + SLACK``, and otherwise tightens
and chooses again (:func:`_choose_measured`).
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanconv import checkpoint
from leanconv.errors import LeanconvError
from leanconv.importance import criterion_names
from leanconv.importance.hessian.hap import HAP_ESTIMATOR
from leanconv.prune3d.executors import LocalExecutor, one_at_a_time
from leanconv.width.budget import check_reachable
from leanconv.prune3d.latency import SideCorrected, check_latency_box, origin_latency, side_profile
from leanconv.prune3d.realise import Origin, StepSettings, brief_finetune, load_origin, min_side, val_accuracy
from leanconv.prune3d.samples import SampleStore, collect_samples, plan_tasks
from leanconv.prune3d.search import alternatives, check_budget, choose, fit_samples, predicted_accuracy, sampling_floors
from leanconv.runs.config import (RunConfig, batch_size, finetune_epochs, finetune_lr, hessian, latency_batch,
                                  latency_repeats, probes, reproducing_command, runtime, score_images, seed, setting,
                                  train_subset)
from leanconv.runs import recovery
from leanconv.runs.latency import MAX_ATTEMPTS, SLACK, LatencyBudget, describe
from leanconv.runs.record import Record, Result, add_latency, measure, one_shot, time_pair
from leanconv.runs.source import Source
from leanconv.util import checks
from leanconv.util.progress import Progress, Stage, quiet

__all__ = ["Prune3dConfig", "run_prune3d", "check_box", "SHORTLIST"]

SHORTLIST = 3  # points timed side by side per attempt under a latency budget: the choice and 2 alternatives


def _whole(low: int):
    return lambda v, n: checks.whole(v, n, at_least=low)


@dataclass(frozen=True)
class Prune3dConfig(RunConfig):
    """Settings of one three-dimensional pruning run (``leanconv prune3d``)."""

    command = "prune3d"

    target: float = setting(0.33, lambda c: "--target-latency" if c.kind == "latency" else "--target-flops",
                            check=lambda v, n: checks.fraction(v, n), always=True, cli=False,
                            help="keep this fraction of the MACs (kind macs) or of the unpruned model's measured "
                            "latency on --runtime (kind latency)")
    kind: str = setting("macs", check=lambda v, n: checks.one_of(v, n, ("macs", "latency")), implied=True)
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
    hessian: str = hessian(HAP_ESTIMATOR, "; with --method hap")
    reconstruct_images: int = recovery.reconstruct_images()  # after every width cut, the samples' included
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
    runtime_threads: int = setting(1, "--runtime-threads", check=_whole(1), metavar="T",
                                   help="intra-op threads of the runtime when timing (default 1; --threads is the "
                                   "sample tasks' torch threads)")
    latency_batch: int = latency_batch()

    def check(self) -> None:
        if self.mixed is not None and self.mixed > self.samples - 1:
            raise LeanconvError(f"--mixed must be at most --samples - 1 ({self.samples - 1}): the unpruned point is "
                                f"one of the samples; got {self.mixed}")

    def budget(self) -> LatencyBudget:
        """Where a latency target holds (this machine's latency table: every sample needs its own
        layer configurations measured, so a table from another device cannot serve)."""
        return LatencyBudget(self.runtime, self.runtime_threads, self.latency_batch, None, self.latency_repeats)

    def step_settings(self, data: str, data_dir: str | None = None, constructor: str | None = None,
                      input_shape: tuple[int, ...] | None = None) -> StepSettings:
        """How each sampling step prunes and briefly fine-tunes (plain values, sent to workers)."""
        return StepSettings(data=data, data_dir=data_dir, method=self.method, normalize=self.normalize,
                            score_images=self.score_images, probes=self.probes, hessian=self.hessian,
                            reconstruct_images=self.reconstruct_images,
                            min_per_stage=self.min_blocks_per_stage, epochs=self.sample_epochs,
                            images=self.sample_images, lr=self.finetune_lr, batch_size=self.batch_size, seed=self.seed,
                            constructor=constructor, input_shape=None if input_shape is None else list(input_shape),
                            latency=None if self.kind == "macs" else {"runtime": self.runtime,
                                                                      "threads": self.runtime_threads,
                                                                      "batch": self.latency_batch})

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
    origin, box = _origin_and_box(config, source, ckpt, say)  # an impossible budget fails here, before any sampling
    if origin.latency is not None:  # points are timed when no other task runs beside them, else predicted
        origin.settings = replace(origin.settings, latency={**origin.settings.latency,
                                                            "timed": one_at_a_time(executor)})
    # latency falls more slowly than r^2 (fixed call costs): sample the whole box then
    w_floor, side_floor = sampling_floors(box, origin.side, config.target, config.clip_box and config.kind == "macs")
    box.update(w_sampled_min=w_floor, side_sampled_min=side_floor)
    tasks = plan_tasks(config.samples, n_blocks=len(origin.blocks), min_keep=origin.min_keep, side=origin.side,
                       min_side=side_floor, w_min=w_floor, target=config.target, mixed=config.mixed)
    say(f"collecting {config.samples} samples ({len(tasks)} tasks)")
    samples = collect_samples(ckpt, origin.settings, tasks, SampleStore(out / "samples.jsonl"),
                              executor or LocalExecutor(0), progress)
    t_samples = time.perf_counter()
    say(f"fitting the accuracy predictor and the {'latency' if config.kind == 'latency' else 'MACs'} model")
    latency = config.kind == "latency"
    budget = config.target if latency else config.target * origin.macs
    fit = fit_samples(samples, 1.0 if latency else origin.macs, monotone=config.monotone, seed=config.seed,
                      holdout_train=config.holdout_train, latency=latency)
    say(f"maximising predicted accuracy under {config.target:g} of the {'latency' if latency else 'MACs'}")
    attempts = None
    if latency:
        result, model, point, curve, attempts = _choose_measured(origin, fit, config, say)
    else:
        result, model, point, curve = choose(origin, fit, budget, r_min=config.r_min, grid=config.grid)
    cut = _one_shot(origin, model, point.side, config) if measured else None
    accuracy = _finish(origin, model, config, say)
    say("measuring")
    after_shape = tuple(model.leanconv_meta["input_shape"])
    before = measure(origin.model, origin.shape, _test_loader(origin, origin.side))
    after = measure(model, after_shape, _test_loader(origin, point.side))
    timing = None
    if measured:
        timing = time_pair(origin.model, model, (origin.shape, after_shape), runtime=config.runtime,
                           threads=config.runtime_threads, repeats=config.latency_repeats,
                           batches=(1, 64, config.latency_batch))
        add_latency(before, after, timing)
    seconds = {"samples": t_samples - t0, "total": time.perf_counter() - t0,
               "sampling_compute": sum(s["seconds"] for s in samples)}
    details = _details(origin, config, box, samples, fit, result, point, curve, accuracy, before, after)
    details["after_prune_before_finetune"] = cut
    details["latency_budget"] = None if attempts is None else {
        **describe(origin.latency), "attempts": attempts, "width_price": "importance",
        "point_latency": "timed side by side" if origin.timed else "predicted by the table"}
    command = reproducing_command(config, source, out)
    record = Record("prune3d", config.to_dict(), command, source.describe(), list(origin.shape), before, after,
                    seconds, details, timing)
    model.leanconv_meta = {**model.leanconv_meta, "test": {"accuracy": after["test_accuracy"]},
                           "prune3d": {"target": config.target, "choice": details["choice"],
                                       "val_accuracy": accuracy["val_after_finetune"]}}
    return Result(model, record)


def _origin_and_box(config: Prune3dConfig, source: Source, ckpt: Path, say: Stage) -> tuple[Origin, dict]:
    """The trained model with what every step needs, and the search box; raises (one line) when
    the model has no prunable channel or the box cannot reach the budget."""
    settings = config.step_settings(source.data.name, source.data_dir, source.constructor, source.input_shape)
    origin = load_origin(str(ckpt), replace(settings, latency=None))
    example = torch.zeros(1, *origin.shape, dtype=next(origin.model.parameters()).dtype)
    check_reachable(origin.model, example, target=0.999, input_shape=origin.shape)  # any prunable channel?
    if config.kind == "latency":
        return origin, _calibrate(origin, config, settings, say)
    return origin, check_budget(origin, config.target, w_min=config.w_min, r_min=config.r_min,
                                min_per_stage=config.min_blocks_per_stage)


def check_box(config: Prune3dConfig, source: Source, ckpt: Path) -> dict:
    """What a run checks before any sampling (``compare`` checks every entry first): the search
    box, or a one-line :class:`~leanconv.errors.LeanconvError` when it cannot meet the budget."""
    return _origin_and_box(config, source, ckpt, quiet)[1]


def _calibrate(origin: Origin, config: Prune3dConfig, settings: StepSettings, say: Stage) -> dict:
    """A latency budget: time the unpruned model on the runtime, calibrate the latency table on
    it (every sample task predicts on this scale), and refuse a target the box cannot reach."""
    say(f"timing the unpruned model on {config.runtime} ({config.runtime_threads} thread(s), batch "
        f"{config.latency_batch})")
    budget = replace(config.budget(), repeats=max(10, config.latency_repeats))  # every sample is scaled by it
    reference = budget.measure({"unpruned": origin.model}, origin.shape).latency_ms["unpruned"]["median_ms"]
    origin.settings = replace(settings, latency={**settings.latency, "reference_ms": reference})
    origin.latency = origin_latency(origin.model, origin.shape, origin.settings.latency)
    return check_latency_box(origin, config.target, w_min=config.w_min, side=min_side(origin, config.r_min))


def _choose_measured(origin: Origin, fit: dict, config: Prune3dConfig, say: Stage):
    """``choose`` under the latency target, then the realised choice and up to ``SHORTLIST - 1``
    alternatives from the budget boundary (:func:`~leanconv.prune3d.search.alternatives`) timed
    side by side with the unpruned model; the one the predictor rates most accurate among those
    measured within ``target + SLACK`` is kept. When none is, the solver's budget tightens by
    ``target / measured`` (of its own choice) and it chooses again, at most ``MAX_ATTEMPTS``
    times. Every attempt is recorded with every candidate timed."""
    goal, attempts, budget = config.target, [], config.budget()
    if origin.timed and not isinstance(fit["cost"], SideCorrected):
        # points were timed, so the fit is on the clock's scale, and so is the profile; points the
        # table predicted keep the table's scale, which each choice is checked against
        sides = range(min_side(origin, config.r_min), origin.side + 1)
        say(f"timing the unpruned model at {len(sides)} input sides ({sides[0]}-{sides[-1]})")
        corrected = SideCorrected(fit["cost"], origin.side, side_profile(origin.model, origin.shape, sides,
                                                                         budget.measure))
        fit["cost"] = corrected  # the caller's record shows the correction with the fit it scales
        fit["cost_model"]["side_correction"] = corrected.to_dict()
    for _ in range(MAX_ATTEMPTS):
        try:
            result, model, point, curve = choose(origin, fit, goal, r_min=config.r_min, grid=config.grid)
        except LeanconvError as err:
            if not attempts:
                raise LeanconvError(f"latency target {config.target:g} is out of reach of the samples on "
                                    f"{config.runtime} ({err}); raise --target-latency, or lower --w-min/--r-min "
                                    "so that the samples reach further") from None
            say(f"warning: no faster point than the last one ({err})")
            break
        found = [(model, point), *alternatives(origin, fit, curve["curve"], {(point.keep, point.side)},
                                               SHORTLIST - 1)]
        rows, unpruned_ms = _time_candidates(origin, fit, budget, found)
        within = [i for i, row in enumerate(rows) if row["measured"]["median"] <= config.target + SLACK]
        kept = max(within, key=lambda i: rows[i]["predicted_accuracy"]) if within else 0
        attempts.append({"goal": goal, **rows[kept], "unpruned_ms": unpruned_ms, "kept": kept, "candidates": rows})
        for i, row in enumerate(rows):
            say(f"goal {goal:.3f}, {'choice' if i == 0 else 'alternative'} side {row['choice']['side']} "
                f"d={row['choice']['d']:.2f}: predicted {row['predicted']:.3f}, measured "
                f"{row['measured']['median']:.3f} ({row['measured']['low']:.3f}-{row['measured']['high']:.3f})"
                f"{' (kept)' if within and i == kept else ''}")
        model, point = found[kept]
        if kept:  # an alternative: the record's choice is what was kept
            chosen = replace(result.choice, d=point.d, w=point.w, r=point.r,
                             predicted_accuracy=rows[kept]["predicted_accuracy"],
                             predicted_macs=float(fit["cost"](point.d, point.w, point.r)))
            result = replace(result, choice=chosen, counted_macs=point.cost)
        if within:
            break
        goal *= config.target / rows[0]["measured"]["median"]
    else:
        say(f"warning: the result measures {attempts[-1]['measured']['median']:.3f} of the unpruned latency, above "
            f"the target {config.target:g} + {SLACK}; the runtime's timing may be noisy here (see the record)")
    return result, model, point, curve, attempts


def _time_candidates(origin: Origin, fit: dict, budget: LatencyBudget, found: list) -> tuple[list[dict], float]:
    """The candidates ``(model, point)`` and the unpruned model timed side by side, in one run."""
    models = {"unpruned": origin.model, **{f"c{i}": model for i, (model, _) in enumerate(found)}}
    shapes = {name: tuple(m.leanconv_meta["input_shape"]) if name != "unpruned" else origin.shape
              for name, m in models.items()}
    sbs = budget.measure(models, shapes)
    rows = [{"predicted": point.table_latency, "solver_cost": point.latency, "measured": sbs.ratio[f"c{i}"],
             "predicted_accuracy": predicted_accuracy(fit, point),
             "choice": {"d": point.d, "w": point.w, "r": point.r, "side": point.side}}
            for i, (_, point) in enumerate(found)]
    return rows, sbs.latency_ms["unpruned"]["median_ms"]


def _one_shot(origin: Origin, model: nn.Module, side: int, config: Prune3dConfig) -> dict:
    """Test accuracy of the chosen model right after the cut, BatchNorm re-estimated (on a copy)."""
    cut = copy.deepcopy(model)
    resolution = None if side == origin.data.image_size else side
    shape = tuple(model.leanconv_meta["input_shape"])
    return one_shot(cut, shape, _test_loader(origin, side), origin.data, resolution, config.batch_size)


def _cost_named(row: dict, kind: str) -> dict:
    """A solver row with its cost keys named for the budget (``*_macs`` -> ``*_latency``: ratios
    of the unpruned latency, the realised one predicted by the table)."""
    if kind == "macs":
        return row
    return {k.replace("_macs", "_latency"): v for k, v in row.items()}


def _details(origin, config, box, samples, fit, result, point, curve, accuracy, before, after) -> dict:
    choice = result.choice
    return {
        "method": "prune3d", "settings": asdict(origin.settings),
        "output_input_shape": [origin.shape[0], point.side, point.side],
        "budget": {"target": config.target, "kind": config.kind, "macs0": origin.macs,
                   "budget_macs": config.target * origin.macs if config.kind == "macs" else None},
        "search_box": box, "samples": samples,
        "predictor": fit["predictor"], "holdout": fit["holdout"], "cost_model": fit["cost_model"],
        "choice": {**_cost_named(choice.to_dict(), config.kind), "realised": point.to_dict(),
                   "counted_macs": point.macs,
                   "within_budget": point.cost <= config.target * (origin.macs if config.kind == "macs" else 1)},
        "resolve_trail": [_cost_named(row, config.kind) for row in result.trail],
        "budget_curve": [_cost_named(row, config.kind) for row in curve["curve"]], "fill": curve["fill"],
        "accuracy": {"predicted_val": choice.predicted_accuracy, "measured_val_protocol": accuracy["val_protocol"],
                     "val_after_finetune": accuracy["val_after_finetune"],
                     "test_before": before["test_accuracy"], "test_after": after["test_accuracy"]},
        "finetune": {"epochs": config.finetune_epochs, "lr": config.finetune_lr,
                     "images": len(origin.data.train) if config.train_subset is None
                     else min(config.train_subset, len(origin.data.train))},
    }
