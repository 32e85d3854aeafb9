"""Width pruning, one run end to end: score, remove to budget, fine-tune, recalibrate, measure.

What ``leanconv prune`` (and ``compare``'s width entries) run. Channel groups are scored
with any registered criterion on validation batches (never the test split) and removed
physically until the model meets the budget: a latency measured on a runtime
(:mod:`leanconv.runs.latency`), or counted MACs or params within 2% of the target (optionally
in ``steps`` rounds with fine-tuning between them, optionally implanting the most sensitive
pruned channels: HAP's Neural Implant). Right after the cut the layers that lost input
channels are refitted by least squares to reproduce the unpruned model's outputs
(``reconstruct_images``, :mod:`leanconv.width.reconstruct`), BatchNorm statistics are
re-estimated on training images and the cut is judged (``after_prune_before_finetune``:
one-shot test accuracy); the model is then fine-tuned with the shared loop (which ends by
re-estimating them again), and accuracy and counted cost are recorded before and after, with
both models timed side by side on the run's runtime (:mod:`leanconv.runs.record`).
Three recovery options (:mod:`leanconv.runs.recovery`): group-lasso training before scoring
(``regularize_epochs``), the reconstruction (``reconstruct_images``) and distillation from the
unpruned model while fine-tuning (``distill``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from leanconv.cost import simd_channels
from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData, criterion_names, run_criterion
from leanconv.importance.hessian.hap import FORMS, HAP_ESTIMATOR
from leanconv.runs.config import (RunConfig, batch_size, finetune_epochs, finetune_lr, hessian, latency_batch,
                                  latency_repeats, latency_table, probes, reproducing_command, runtime, score_images,
                                  seed, setting, threads, train_subset)
from leanconv.runs import recovery
from leanconv.runs.latency import LatencyBudget, describe, prune_to_measured_latency
from leanconv.runs.record import Record, Result, add_latency, counted, measure, one_shot, time_pair
from leanconv.runs.source import Source
from leanconv.train import finetune
from leanconv.train.finetune import recalibrate_on_training_data
from leanconv.util import checks
from leanconv.util.progress import Progress, Stage, quiet
from leanconv.width.budget import check_reachable, iterative_prune, prune_to_budget
from leanconv.width.implant_fit import IMPLANT_INITS

__all__ = ["PruneConfig", "round_to_arg", "run_prune"]


def round_to_arg(text: str) -> int | None:
    """``--round-to``: a whole number, or ``auto`` for this CPU's float32 vector width."""
    return simd_channels() if text == "auto" else int(text)


TARGET_FLAGS = {"macs": "--target-flops", "params": "--target-params", "latency": "--target-latency"}


def _implant_share(value: Any, name: str) -> float:
    return checks.number(value, name, at_least=0, below=1)


@dataclass(frozen=True)
class PruneConfig(RunConfig):
    """Settings of one width-pruning run (``leanconv prune``)."""

    command = "prune"

    method: str = setting("hap", "--method", check=lambda v, n: checks.one_of(v, n, criterion_names()),
                          always=True, choices=criterion_names, help="importance criterion")
    target: float = setting(0.5, lambda c: TARGET_FLAGS.get(c.kind, "--target-flops"),
                            check=lambda v, n: checks.fraction(v, n), always=True, cli=False,
                            help="keep this fraction of the MACs (kind macs), parameters (kind params) or of the "
                            "unpruned model's measured latency on --runtime (kind latency)")
    kind: str = setting("macs", check=lambda v, n: checks.one_of(v, n, tuple(TARGET_FLAGS)), implied=True)
    implant: float = setting(0.0, "--implant", check=_implant_share, metavar="F",
                             help="share of the pruned channels to implant as a 1x1 conv instead of removing")
    implant_init: str = setting("zero", "--implant-init", check=lambda v, n: checks.one_of(v, n, IMPLANT_INITS),
                                choices=IMPLANT_INITS,
                                help="how implants start: zero (HAP) or fit = least-squares stand-in for the "
                                "replaced filters, fitted on the scoring images")
    # score scaling before the global ranking: "mean" divides each group's scores by their
    # mean (every criterion, hap included: measured better for hap too), "none" keeps them raw
    normalize: str = setting("mean", "--normalize", check=lambda v, n: checks.one_of(v, n, ("mean", "none")),
                             choices=("mean", "none"),
                             help="scale each group's scores before the global ranking: mean = divide by the "
                             "group's mean, none = raw (comparable across layers only if the criterion makes them so)")
    shrink: bool = setting(False, "--shrink", help="hap: shrink each channel's trace estimate toward its layer's "
                           "mean by its standard error before ranking (default: raw estimates, measured more "
                           "accurate here)")
    hessian: str = hessian(HAP_ESTIMATOR)
    hap_form: str | None = setting(None, "--hap-form",
                                   check=lambda v, n: v if v is None else checks.one_of(v, n, FORMS), choices=FORMS,
                                   help="hap: block = the whole quadratic form W_p^T H_pp W_p, the second-order loss "
                                   "change of zeroing the channel (needs --hessian gauss-newton); trace = "
                                   "Tr(H_pp)/numel(W_p)*||W_p||^2 (the paper's approximation of it) (default: block "
                                   "with gauss-newton, trace with the probing estimators)")
    latency_aware: bool = setting(False, "--latency-aware", help="time every resized layer on this machine first "
                                  "and prefer cutting channels that cost more time per MAC (same MAC budget, more "
                                  "speed)")
    round_to: int | None = setting(None, "--round-to",
                                   check=lambda v, n: v if v is None else checks.whole(v, n, at_least=1),
                                   parse=round_to_arg, expects="a positive whole number or 'auto'",
                                   metavar="N|auto",
                                   help="keep pruned channel counts multiples of N; auto = this CPU's float32 vector "
                                   "width (16 with AVX-512, 8 with AVX2), where a CPU conv is fastest per MAC")
    strict: bool = setting(True, "--keep-unprunable", help="keep (do not prune) channels that pass through layers "
                           "leanconv cannot resize, such as a channel shuffle, instead of stopping with an error")
    steps: int = setting(1, "--steps", check=lambda v, n: checks.whole(v, n, at_least=1), metavar="K",
                         help="prune in K rounds with fine-tuning between them")
    finetune_epochs: int = finetune_epochs(0, "fine-tuning epochs after the cut")
    finetune_lr: float = finetune_lr()
    # recovery (runs/recovery.py): distillation while fine-tuning, group-lasso training before the cut
    distill: bool = recovery.distill()
    distill_temperature: float = recovery.distill_temperature()
    distill_weight: float = recovery.distill_weight()
    regularize_epochs: int = recovery.regularize_epochs()
    regularize_strength: float = recovery.regularize_strength()
    reconstruct_images: int = recovery.reconstruct_images()
    train_subset: int | None = train_subset()
    score_images: int = score_images()
    probes: int = probes(64)
    seed: int = seed()
    batch_size: int = batch_size()
    latency_repeats: int = latency_repeats()
    runtime: str = runtime()
    threads: int = threads()
    latency_batch: int = latency_batch()
    latency_table: str | None = latency_table()
    # None: 8 for a latency budget, 1 (the plain global ranking, as before) for MAC/params budgets
    candidates: int | None = setting(None, "--candidates", metavar="N",
                                     check=lambda v, n: v if v is None else checks.whole(v, n, at_least=1),
                                     help="choose the per-layer allocation among N by validation loss right after "
                                     "the cut, BatchNorm re-estimated (EagleEye): the plain one and N-1 drawn with "
                                     "each layer's scores randomly shifted (latency: prices randomly scaled); "
                                     "default 8 for --target-latency, 1 for --target-flops/--target-params")

    def allocations(self) -> int:
        """How many allocations the run judges: ``candidates``, or its default for the budget."""
        return self.candidates if self.candidates is not None else 8 if self.kind == "latency" else 1

    def run(self, source: Source, **kwargs: Any) -> Result:
        return run_prune(self, source, **kwargs)

    def check(self) -> None:
        recovery.check_settings(self)
        if self.hap_form == "block" and self.hessian != "gauss-newton":  # None: the estimator's own form
            raise LeanconvError("--hap-form block needs the exact Gauss-Newton blocks; add --hessian gauss-newton")
        if self.latency_table is not None and self.kind != "latency":
            raise LeanconvError("--latency-table is for --target-latency; drop it or give a latency target")
        if self.kind == "latency":
            for flag, bad in (("--implant", self.implant > 0), ("--round-to", self.round_to is not None),
                              ("--latency-aware", self.latency_aware)):
                if bad:
                    raise LeanconvError(f"{flag} does not apply to --target-latency (the solver keeps only channel "
                                        "counts on the runtime's measured staircase); drop it or use --target-flops")

    def budget(self) -> LatencyBudget:
        return LatencyBudget(self.runtime, self.threads, self.latency_batch, self.latency_table, self.latency_repeats)

    def check_target(self, model, example: torch.Tensor, shape: tuple[int, ...], stage: Stage | None = None):
        """Refuse a target ``model`` cannot reach with these settings (implants and rounding
        included), without scoring: what a run checks before any work, and compare before its
        first. A latency target measures the unpruned model and the layers the solver may
        choose on the runtime (the latency table) and returns that calibrated model."""
        if self.kind == "latency":
            return self.budget().check(model, example, shape, self.target, strict=self.strict, stage=stage)
        check_reachable(model, example, target=self.target, kind=self.kind, input_shape=shape,
                        round_to=self.round_to, strict=self.strict, implant=self.implant)
        return None


def _split(total: int, parts: int) -> list[int]:
    """``total`` epochs over ``parts`` rounds, the remainder going to the last rounds: 5, 3 -> [1, 2, 2]."""
    return [total // parts + (1 if i >= parts - total % parts else 0) for i in range(parts)]


def _merge_layers(results) -> dict[str, list[int]]:
    """Channels per layer before the first round and after the last."""
    first, last = results[0].layers, results[-1].layers
    return {name: [first[name][0], last.get(name, first[name])[1]] for name in first}


def run_prune(config: PruneConfig, source: Source, *, out=None, progress: Progress | None = None,
              stage: Stage | None = None, measured: bool = True) -> Result:
    """Prune a fresh copy of ``source``'s model per ``config`` (module docstring). With
    ``measured`` False only counted costs are recorded (a caller that measures the result
    itself, like ``compare``, skips the test-set evaluations and latency runs). ``out`` is
    the folder the reproducing command names."""
    say = stage or quiet
    t0 = time.perf_counter()
    criterion = run_criterion(config.method, probes=config.probes, seed=config.seed, progress=progress,
                              shrink=config.shrink, estimator=config.hessian,
                              form=config.hap_form)  # an unknown method fails here, before any work
    model, data, shape, resolution = source.fresh(), source.data, source.shape, source.resolution
    if data is None and (config.candidates or 1) > 1:
        raise LeanconvError("--candidates judges allocations on validation images: give the run data, or drop it")
    example = torch.randn(1, *shape)  # the engine gives it the model's dtype (util.model_io.to_model)
    latency = config.check_target(model, example, shape, stage=say)  # before any scoring or tuning
    teacher = recovery.teacher_loss(config, source, model, example)  # --distill: checked before any work
    test = data.loader("test", 256, resolution=resolution) if measured else None
    say("measuring the unpruned model")
    gauge = (lambda m: measure(m, shape, test)) if measured else (lambda m: counted(m, shape))
    before = gauge(model)
    regularized = recovery.regularize_before_cut(config, model, data, example, resolution, test=test,
                                                 progress=progress, stage=say)
    scoring = None if data is None else ScoringData(
        data.scoring_batches(config.score_images, config.batch_size, resolution), extra={"input_shape": shape})

    def tune(m, epochs: int) -> None:
        finetune(m, data, epochs=epochs, lr=config.finetune_lr, seed=config.seed, batch_size=config.batch_size,
                 resolution=resolution, images=config.train_subset, progress=progress, loss=teacher)

    options = {"kind": config.kind, "input_shape": shape, "data": scoring, "round_to": config.round_to,
               "normalize": config.normalize, "latency_aware": config.latency_aware,
               "implant_init": config.implant_init, "strict": config.strict,
               **({"candidates": config.allocations(), "seed": config.seed} if scoring is not None else {})}
    rebuilt: list[dict[str, Any] | None] = []  # one reconstruction record per cut (round)

    def refit(original, m, result) -> None:
        rebuilt.append(recovery.reconstruct_after_cut(config, original, m, result.removed, data, example, resolution,
                                                      progress=progress, stage=say))

    refitting = bool(config.reconstruct_images) and data is not None
    one_cut = config.steps == 1 or config.kind == "latency"  # else iterative_prune copies the model per round
    original = copy.deepcopy(model) if refitting and one_cut else None
    say(f"scoring with {config.method} and pruning to {config.target:g} of the {config.kind}")
    cut, attempts = None, None  # with several rounds, fine-tuning is interleaved with them
    if config.kind == "latency":
        results, attempts = prune_to_measured_latency(model, criterion, example, latency, config.budget(),
                                                      target=config.target, shape=shape, data=scoring,
                                                      normalize=config.normalize, strict=config.strict,
                                                      candidates=config.allocations(), seed=config.seed,
                                                      progress=progress, stage=say)
    elif config.steps == 1:
        results = [prune_to_budget(model, criterion, example, target=config.target, implant=config.implant, **options)]
    if one_cut:
        refit(original, model, results[-1])
        if measured:
            cut = one_shot(model, shape, test, data, resolution, config.batch_size)
        elif data is not None:  # the cut's own BatchNorm statistics, whatever comes next
            recalibrate_on_training_data(model, data, resolution, config.batch_size)
        say(f"fine-tuning for {config.finetune_epochs} epochs")
        tune(model, config.finetune_epochs)
    else:
        epochs = _split(config.finetune_epochs, config.steps)
        results = iterative_prune(model, criterion, example, lambda m, s: tune(m, epochs[s - 1]),
                                  target=config.target, steps=config.steps, implant=config.implant,
                                  after_cut=refit if refitting else None, **options)
    say("measuring the pruned model")
    after = gauge(model)
    timing = None
    if measured:
        say(f"timing the unpruned and the pruned model side by side on {config.runtime}")
        timing = time_pair(source.fresh(), model, (shape, shape), runtime=config.runtime, threads=config.threads,
                           repeats=config.latency_repeats, batches=(1, 64, config.latency_batch))
        add_latency(before, after, timing)
    traces = getattr(criterion, "last_traces", None)
    details = {"method": config.method, "after_prune_before_finetune": cut, "rounds": [r.to_dict() for r in results],
               "latency_budget": None if attempts is None else {**describe(latency), "attempts": attempts},
               "layers": _merge_layers(results), "regularization": regularized,
               "reconstruction": rebuilt[0] if len(rebuilt) == 1 else (rebuilt or None),
               "distillation": recovery.distillation_record(config),
               "hessian": None if traces is None else {"probes": traces.probes, "converged": traces.converged,
                                                       "seconds": traces.seconds, "method": traces.method}}
    command = reproducing_command(config, source, out)
    record = Record("prune", config.to_dict(), command, source.describe(), list(shape), before, after,
                    time.perf_counter() - t0, details, timing)
    model.leanconv_meta = {**getattr(model, "leanconv_meta", {}),
                           "prune": {"method": config.method, "config": config.to_dict(),
                                     "achieved": record.derived()["achieved"]},
                           **({"test": {"accuracy": after["test_accuracy"]}} if measured else {})}
    return Result(model, record)
