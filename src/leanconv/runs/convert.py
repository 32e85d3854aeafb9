"""Layer conversion, one run end to end: swap convs for DW + SCC or pSConv, fine-tune, record.

What ``leanconv convert`` (and ``compare``'s ``scc`` and ``psconv`` entries) run: the convs
that the placement rules of :mod:`leanconv.convs.convert` pick are replaced by freshly
initialised sliding-channel (DSXplore) or periodic sparse (pSConv) layers, drawn from
``seed``; every other weight is kept. With ``finetune_epochs`` the whole model is then
fine-tuned with the shared loop and BatchNorm statistics are re-estimated
(:func:`leanconv.train.finetune`). The record holds the counted cost before and after and,
when the model was fine-tuned, test accuracy and latency too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from leanconv.convs.convert import CONVERSIONS, ConversionSpec, convert
from leanconv.errors import LeanconvError
from leanconv.layers.periodic_sparse import PATTERNS
from leanconv.runs.config import (RunConfig, batch_size, finetune_epochs, finetune_lr, latency_repeats,
                                  reproducing_command, runtime, seed, setting, threads, train_subset)
from leanconv.runs.record import Record, Result, add_latency, counted, measure, time_pair
from leanconv.runs.source import Source
from leanconv.train import finetune
from leanconv.util import checks
from leanconv.util.progress import Progress, Stage, quiet

__all__ = ["ConvertConfig", "run_convert", "LAYER_LR"]

LAYER_LR = 0.05  # converted layers start from random weights: they need more than a fine-tuning rate


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
    seed: int = seed()
    finetune_epochs: int = finetune_epochs(0, "fine-tune the converted model for N epochs (0: convert only)")
    finetune_lr: float = finetune_lr(LAYER_LR)
    train_subset: int | None = train_subset()
    batch_size: int = batch_size()
    latency_repeats: int = latency_repeats()
    runtime: str = runtime()
    threads: int = threads()

    def check(self) -> None:
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

    def spec(self) -> ConversionSpec:
        """The conversion as :func:`leanconv.convs.convert.convert` takes it."""
        if self.to == "scc":
            return ConversionSpec("scc", self.groups, self.overlap)
        return ConversionSpec("psconv", pattern=self.pattern)

    def run(self, source: Source, **kwargs: Any) -> Result:
        return run_convert(self, source, **kwargs)


def run_convert(config: ConvertConfig, source: Source, *, out=None, progress: Progress | None = None,
                stage: Stage | None = None, measured: bool = True) -> Result:
    """Convert a fresh copy of ``source``'s model per ``config`` and fine-tune it (module
    docstring). With ``measured`` (and fine-tuning) the record holds test accuracy and latency
    before and after, else counted costs only. ``out`` is the folder the reproducing command
    names."""
    say, t0 = stage or quiet, time.perf_counter()
    if config.finetune_epochs > 0 and source.data is None:
        raise LeanconvError("fine-tuning a converted model needs data; pass --data")
    spec = config.spec()
    model, shape = source.fresh(), source.shape
    with torch.random.fork_rng(devices=[]):  # the new layers are drawn from the seed alone
        torch.manual_seed(config.seed)
        convert(model, spec.to, groups=spec.groups, overlap=spec.overlap, pattern=spec.pattern)  # checks first
    full = measured and config.finetune_epochs > 0
    test = source.data.loader("test", 256, resolution=source.resolution) if full else None
    gauge = (lambda m: measure(m, shape, test)) if full else (lambda m: counted(m, shape))
    before = gauge(source.fresh())
    if config.finetune_epochs > 0:
        say(f"fine-tuning for {config.finetune_epochs} epochs at lr {config.finetune_lr:g}")
        finetune(model, source.data, epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed,
                 batch_size=config.batch_size, resolution=source.resolution, images=config.train_subset,
                 progress=progress)
    after = gauge(model)
    timing = None
    if full:
        say(f"timing the original and the converted model side by side on {config.runtime}")
        timing = time_pair(source.fresh(), model, (shape, shape), runtime=config.runtime, threads=config.threads,
                           repeats=config.latency_repeats)
        add_latency(before, after, timing)
    details = {"method": spec.name, "conversion": spec.to_dict(), "name": spec.name,
               "layers": model.leanconv_meta["conversions"][-1]["layers"]}
    command = reproducing_command(config, source, out)
    record = Record("convert", config.to_dict(), command, source.describe(), list(shape), before, after,
                    time.perf_counter() - t0, details, timing)
    if full:
        model.leanconv_meta = {**model.leanconv_meta, "test": {"accuracy": after["test_accuracy"]}}
    return Result(model, record)
