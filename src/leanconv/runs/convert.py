"""Layer conversion, one run end to end: swap convs for DW + SCC or pSConv, fit, fine-tune, record.

What ``leanconv convert`` (and ``compare``'s ``scc`` and ``psconv`` entries) run:

1. **Where** (``where``): ``all`` converts every conv that the placement rules of
   :mod:`leanconv.convs.convert` pick; a list of paths converts those only; ``auto`` times each
   candidate alone against its replacement, side by side on ``runtime`` at ``latency_batch``
   (:mod:`leanconv.convs.placement`) in every exact form that runtime can run, keeps the layers
   whose fastest form is measured faster by ``where_margin``, then times the whole model with
   them converted side by side with the original and drops the half that gained least alone
   until it is faster by that margin too; each converted layer keeps its fastest form (its
   ``impl``, saved with the model). ``all`` and paths keep the layers' ``auto`` form.
2. **Initialisation** (``init``): ``fit`` starts each new layer from the trained layer it
   replaces, fitted by least squares to that layer's outputs on ``fit_images`` training images,
   layer by layer (:func:`leanconv.convs.init_fit.fit_layers`); ``random`` draws the new layers
   from ``seed`` as the papers do (they train converted models from scratch). ``auto`` (the
   default) is ``fit`` when the run has data, else ``random``. Every other weight is kept.
   Before a fitted pSConv start, ``reorder`` (``auto``: on) renumbers the trained model's
   channels, an exact change, so that the pattern keeps the most of the kernels it will cut
   (:func:`leanconv.convs.pattern_order.order_for_pattern`); the record gives each layer's
   kept share before and after.
3. **Judged right away**: with data, the converted model's test accuracy is recorded
   (``converted``) before any fine-tuning: after a random start with BatchNorm statistics
   re-estimated on training images; after a fitted start with the trained statistics, which
   the fit targets (the accuracy with re-estimated ones is recorded beside).
4. With ``finetune_epochs`` the whole model is fine-tuned with the shared loop and BatchNorm
   statistics re-estimated (:func:`leanconv.train.finetune`); the default rate is 0.01 after a
   fitted start and 0.05 after a random one. ``distill`` fine-tunes by distillation from the
   unconverted model (:mod:`leanconv.runs.recovery`).

The record holds the counted cost before and after, the layers converted with, per layer, the
share of the replaced layer's output the start leaves unexplained and, with ``auto``, every
candidate's measured time ratio; and, when the model was fine-tuned, test accuracy and the
two models' latency timed side by side.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from leanconv.convs.convert import CONVERSIONS, ConversionSpec, convert, replacements
from leanconv.convs.init_fit import fit_layers
from leanconv.convs.pattern_order import order_for_pattern
from leanconv.convs.placement import choose, confirm, measure_layers, set_forms
from leanconv.errors import LeanconvError
from leanconv.layers.periodic_sparse import PATTERNS
from leanconv.runs import recovery
from leanconv.runs.config import (RunConfig, batch_size, finetune_epochs, latency_repeats,
                                  reproducing_command, runtime, seed, setting, threads, train_subset)
from leanconv.runs.record import Record, Result, add_latency, counted, measure, one_shot, time_pair
from leanconv.runs.source import Source
from leanconv.train import evaluate, finetune
from leanconv.util import checks
from leanconv.util.progress import Progress, Stage, quiet

__all__ = ["ConvertConfig", "run_convert", "LAYER_LR", "FITTED_LR"]

LAYER_LR = 0.05  # new layers drawn at random need more than a fine-tuning rate
FITTED_LR = 0.01  # fitted new layers start near the trained ones: a fine-tuning rate
INITS = ("auto", "fit", "random")
REORDERS = ("auto", "pattern", "none")


def _where(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(not p.strip() for p in value.split(",")):
        raise LeanconvError(f"{name} takes all, auto or comma-separated layer paths (e.g. layer1.0.conv2), "
                            f"got {checks.brief(value)}")
    return value


@dataclass(frozen=True)
class ConvertConfig(RunConfig):
    """Settings of one layer conversion (``leanconv convert``)."""

    command = "convert"

    to: str = setting("scc", "--to", check=lambda v, n: checks.one_of(v, n, CONVERSIONS), always=True,
                      choices=CONVERSIONS, help="target layer type")
    groups: int | None = setting(None, "--groups", metavar="G",
                                 check=lambda v, n: v if v is None else checks.whole(v, n, at_least=1),
                                 help="scc: channel groups; each output reads C_in/G input channels (required for scc)")
    overlap: float | None = setting(None, "--overlap", metavar="O",
                                    help="scc: overlap of neighbouring windows in [0, 1) (default: 0.5)",
                                    expects="a number")
    pattern: str | None = setting(None, "--pattern", choices=tuple(sorted(PATTERNS)),
                                  help="psconv: kernel pattern (default: psd4_p8)")
    where: str = setting("all", "--where", check=_where, metavar="all|auto|PATHS",
                         help="which convs: all = every one the placement rules pick, auto = only those whose "
                         "fastest exact form is measured faster than dense on --runtime at --batch by --where-margin "
                         "(each converted layer keeps that form), or comma-separated layer paths")
    where_margin: float = setting(0.05, "--where-margin", metavar="M",
                                  check=lambda v, n: checks.number(v, n, at_least=0, below=1),
                                  help="auto: convert a layer only when its new form takes at most 1-M of the dense "
                                  "conv's time", expects="a number")
    latency_batch: int = setting(1, "--batch", check=lambda v, n: checks.whole(v, n, at_least=1), metavar="B",
                                 help="auto: the batch size the layers are timed at; records time batches 1 and 64")
    init: str = setting("auto", "--init", check=lambda v, n: checks.one_of(v, n, INITS), choices=INITS,
                        help="fit = start each new layer from the trained layer it replaces (least squares on "
                        "--fit-images training images), random = fresh layers as the papers train them, auto = "
                        "fit when there is data")
    reorder: str = setting("auto", "--reorder", check=lambda v, n: checks.one_of(v, n, REORDERS), choices=REORDERS,
                           help="psconv with a fitted start: pattern = first renumber the trained model's channels "
                           "(an exact change) so that the pattern keeps the most of its kernels, none = keep the "
                           "numbering, auto = pattern for psconv with a fitted start")
    fit_images: int = setting(512, "--fit-images", check=lambda v, n: checks.whole(v, n, at_least=1), metavar="N",
                              help="training images the fit uses")
    seed: int = seed()
    finetune_epochs: int = finetune_epochs(0, "fine-tune the converted model for N epochs (0: convert only)")
    distill: bool = recovery.distill()
    distill_temperature: float = recovery.distill_temperature()
    distill_weight: float = recovery.distill_weight()
    finetune_lr: float | None = setting(None, "--finetune-lr", metavar="LR",
                                        check=lambda v, n: v if v is None else checks.number(v, n, above=0),
                                        help="fine-tuning learning rate, cosine from it (default: 0.01 after a "
                                        "fitted start, 0.05 after a random one)", expects="a number")
    train_subset: int | None = train_subset()
    batch_size: int = batch_size()
    latency_repeats: int = latency_repeats()
    runtime: str = runtime()
    threads: int = threads()

    def check(self) -> None:
        recovery.check_settings(self)
        if self.to == "scc":
            if self.groups is None:
                raise LeanconvError("--to scc needs --groups G (e.g. --groups 2)")
            if self.pattern is not None:
                raise LeanconvError("--pattern applies to --to psconv only")
            if self.overlap is None:
                object.__setattr__(self, "overlap", 0.5)  # the default, written into the record
            checks.number(self.overlap, "--overlap", at_least=0, below=1)
        else:
            if self.groups is not None or self.overlap is not None:
                raise LeanconvError("--groups and --overlap apply to --to scc only")
            if self.pattern is None:
                object.__setattr__(self, "pattern", "psd4_p8")
            checks.one_of(self.pattern, "--pattern", PATTERNS)
        if self.reorder == "pattern" and (self.to != "psconv" or self.init == "random"):
            raise LeanconvError("--reorder pattern applies to --to psconv with a fitted start (--init fit or auto)")

    def spec(self) -> ConversionSpec:
        """The conversion as :func:`leanconv.convs.convert.convert` takes it."""
        if self.to == "scc":
            return ConversionSpec("scc", self.groups, self.overlap)
        return ConversionSpec("psconv", pattern=self.pattern)

    def run(self, source: Source, **kwargs: Any) -> Result:
        return run_convert(self, source, **kwargs)


def _paths(config: ConvertConfig, source: Source, spec, say) -> tuple[list[str] | None, list | None, list | None]:
    """The layers to convert (None: all the rules pick) and, for ``auto``, every candidate's
    :class:`~leanconv.convs.placement.LayerTiming` and the whole-model checks."""
    if config.where == "all":
        return None, None, None
    model = source.fresh()
    if config.where != "auto":
        paths = [p.strip() for p in config.where.split(",")]
        replacements(model, spec, paths)  # names every path the rules cannot convert
        return paths, None, None
    say(f"timing each candidate layer against its {spec.name} form on {config.runtime}, batch {config.latency_batch}")
    with torch.random.fork_rng(devices=[]):
        new = replacements(model, spec)
    timings = measure_layers(model, new, source.shape, runtime=config.runtime, threads=config.threads,
                             batch=config.latency_batch)
    chosen = choose(timings, config.where_margin)
    if not chosen:
        best = min(timings, key=lambda t: t.ratio["median"])
        raise LeanconvError(f"--where auto: no layer runs faster as {spec.name} on {config.runtime} at batch "
                            f"{config.latency_batch} (best: {best.path} at {best.ratio['median']:.2f}x the dense "
                            "time); nothing to convert. Try another --runtime or --batch, or --where all")
    say(f"{len(chosen)} layers are faster alone; timing the whole model with them converted")
    confirmed, checks = confirm(model, spec, timings, chosen, source.shape, runtime=config.runtime,
                                threads=config.threads, batch=config.latency_batch, margin=config.where_margin)
    if not confirmed:
        raise LeanconvError(f"--where auto: {len(chosen)} layers run faster alone as {spec.name} on {config.runtime} "
                            f"at batch {config.latency_batch}, but no set of them makes the whole model faster "
                            f"(all of them: {checks[0]['ratio']['median']:.2f}x the dense model's time); nothing to "
                            "convert. Try another --runtime or --batch, or --where all")
    return confirmed, timings, checks


def _training_images(source: Source, count: int, batch_size: int):
    loader = source.data.loader("train", min(batch_size, count), resolution=source.resolution,
                                subset=min(count, len(source.data.train)))
    return (batch[0] if isinstance(batch, (tuple, list)) else batch for batch in loader)


def _right_after(model, shape, test, source: Source, batch_size: int, init: str) -> dict[str, Any]:
    """The converted model judged before any fine-tuning. A random start gets BatchNorm
    statistics re-estimated on training images (the trained ones do not describe it). A fitted
    start keeps the trained statistics, since the fit targets the trained layers' outputs; the
    accuracy with re-estimated ones is recorded beside (it is lower where much of a layer's
    output is left unexplained)."""
    if init != "fit":
        return one_shot(model, shape, test, source.data, source.resolution, batch_size)
    trial = copy.deepcopy(model)
    reestimated = one_shot(trial, shape, test, source.data, source.resolution, batch_size)
    kept = evaluate(model, test)["accuracy"]
    return {**counted(model, shape), "test_accuracy": kept, "test_accuracy_bn_reestimated":
            reestimated["test_accuracy"], "bn": "kept from the trained model"}


def run_convert(config: ConvertConfig, source: Source, *, out=None, progress: Progress | None = None,
                stage: Stage | None = None, measured: bool = True) -> Result:
    """Convert a fresh copy of ``source``'s model per ``config``, fit and fine-tune it (module
    docstring). With ``measured`` (and data) the record holds test accuracy right after the
    conversion and, with fine-tuning, after it, and the latency of both models; else counted
    costs only. ``out`` is the folder the reproducing command names."""
    say, t0 = stage or quiet, time.perf_counter()
    if config.finetune_epochs > 0 and source.data is None:
        raise LeanconvError("fine-tuning a converted model needs data; pass --data")
    if config.init == "fit" and source.data is None:
        raise LeanconvError("--init fit needs training images to fit on; pass --data (or use --init random)")
    init = config.init if config.init != "auto" else ("fit" if source.data is not None else "random")
    lr = config.finetune_lr if config.finetune_lr is not None else (FITTED_LR if init == "fit" else LAYER_LR)
    spec = config.spec()
    paths, timings, checks = _paths(config, source, spec, say)
    dense, shape = source.fresh(), source.shape
    reorder = None
    if init == "fit" and spec.to == "psconv" and config.reorder != "none":
        say("renumbering channels so that the pattern keeps the most of the trained kernels")
        example = next(_training_images(source, 16, config.batch_size))
        reorder = order_for_pattern(dense, example, list(replacements(dense, spec, layers=paths)), spec.pattern)
    model = copy.deepcopy(dense)
    with torch.random.fork_rng(devices=[]):  # the new layers are drawn from the seed alone
        torch.manual_seed(config.seed)
        convert(model, spec.to, groups=spec.groups, overlap=spec.overlap, pattern=spec.pattern, layers=paths)
    converted = model.leanconv_meta["conversions"][-1]["layers"]
    if timings is not None:
        set_forms(model, [t for t in timings if t.path in converted])  # each layer in its fastest form
    fits = None
    if init == "fit":
        say(f"fitting {len(converted)} new layers to the trained ones on {config.fit_images} training images")
        fits = fit_layers(dense, model, converted,
                          _training_images(source, config.fit_images, config.batch_size), progress=progress)
    judged = measured and source.data is not None
    test = source.data.loader("test", 256, resolution=source.resolution) if judged else None
    before = measure(source.fresh(), shape, test) if judged else counted(source.fresh(), shape)
    right_after = _right_after(model, shape, test, source, config.batch_size, init) if judged else None
    if config.finetune_epochs > 0:
        teacher = recovery.teacher_loss(config, source, model, torch.zeros(1, *shape))
        say(f"fine-tuning for {config.finetune_epochs} epochs at lr {lr:g}" + (" by distillation" if teacher else ""))
        finetune(model, source.data, epochs=config.finetune_epochs, lr=lr, seed=config.seed,
                 batch_size=config.batch_size, resolution=source.resolution, images=config.train_subset,
                 progress=progress, loss=teacher)
    after = measure(model, shape, test) if judged else counted(model, shape)
    timing = None
    if judged and config.finetune_epochs > 0:
        say(f"timing the original and the converted model side by side on {config.runtime}")
        timing = time_pair(source.fresh(), model, (shape, shape), runtime=config.runtime, threads=config.threads,
                           repeats=config.latency_repeats)
        add_latency(before, after, timing)
    details = {"method": spec.name, "conversion": spec.to_dict(), "name": spec.name, "layers": converted,
               "init": init, "finetune_lr": lr, "where": config.where,
               "distillation": recovery.distillation_record(config, "the unconverted model"),
               **({"converted": right_after} if right_after is not None else {}),
               **({"fit": fits} if fits is not None else {}),
               **({"reorder": reorder} if reorder is not None else {}),
               **({"layer_timings": [{**t.to_dict(), "converted": t.path in converted} for t in timings],
                   "whole_model_checks": checks} if timings is not None else {})}
    command = reproducing_command(config, source, out)
    record = Record("convert", config.to_dict(), command, source.describe(), list(shape), before, after,
                    time.perf_counter() - t0, details, timing)
    if judged:
        model.leanconv_meta = {**model.leanconv_meta, "test": {"accuracy": after["test_accuracy"]}}
    return Result(model, record)
