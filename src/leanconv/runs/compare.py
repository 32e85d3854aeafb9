"""Compress one trained model every way leanconv knows, with one fine-tuning budget, and record it.

``run_compare`` measures the baseline (test accuracy, counted params and MACs, latency at
batch 1 and 64 in eager PyTorch and ONNX Runtime), its per-layer Hessian sensitivity, then
one *entry* per (contender, budget): the width criteria (``hap``, ``hap+implant``, ``l1``,
``l2``, ``bn``, ``taylor``, ``random``, ``synflow``), 3-D pruning (``3d``) and the new layer
types (``scc``, ``psconv``; these replace layers rather than aim at a budget). Every entry
gets the same fine-tuning epochs, is saved under ``DIR/entries/<key>/``, exported to ONNX
(output checked against PyTorch) and timed the same way. Each record is appended to
``DIR/results.jsonl`` as soon as it exists, and a key already there is never redone, so an
interrupted comparison resumes and a re-run with more methods or budgets adds only those.
The file's first record (``kind: run``) holds the run's identity: the checkpoint's content
hash, the data, the input shape and every setting that changes the models (``IDENTITY``); a
re-run whose identity differs is refused before any work, so one table never mixes runs.
Every entry is a run config (:func:`entry_config`: a ``PruneConfig``, ``Prune3dConfig`` or
``ConvertConfig``) run by its own run function, so its ``command`` is that config's
reproducing command. ``leanconv.report.build.build_report`` turns the file into
``report.html`` / ``report.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanconv.convs.convert import convert
from leanconv.cost import count
from leanconv.cost.runtimes import Prepared, prepare
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.deploy.onnx import OPSETS, export_onnx
from leanconv.errors import LeanconvError
from leanconv.importance.hessian.hap import HAP_ESTIMATOR
from leanconv.layers.periodic_sparse import PATTERNS
from leanconv.runs import recovery
from leanconv.runs.config import (RunConfig, command_line, finetune_epochs, finetune_lr, hessian, latency_batch,
                                  latency_repeats, latency_table, probes, runtime, score_images, seed, setting, threads,
                                  train_subset)
from leanconv.runs.convert import ConvertConfig
from leanconv.runs.latency import final_attempt
from leanconv.runs.prune import PruneConfig
from leanconv.runs.prune3d import Prune3dConfig, check_box
from leanconv.runs.record import Result
from leanconv.runs.results import append_result, read_results
from leanconv.runs.sensitivity import SensitivityConfig
from leanconv.runs.source import Source
from leanconv.train import evaluate
from leanconv.train.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT
from leanconv.util import checks
from leanconv.util.files import file_sha256
from leanconv.util.progress import Progress
from leanconv.width.channels import channel_counts

__all__ = ["CompareConfig", "run_compare", "entry_config", "entry_keys", "CONTENDERS", "DEFAULT_METHODS", "IDENTITY"]

log = logging.getLogger(__name__)

WIDTH = {"hap": ("hap", 0.0), "hap+implant": ("hap", 0.1), "l1": ("l1", 0.0), "l2": ("l2", 0.0),
         "bn": ("bn", 0.0), "taylor": ("taylor", 0.0), "random": ("random", 0.0), "synflow": ("synflow", 0.0)}
LAYERS = ("scc", "psconv")
CONTENDERS = (*WIDTH, "3d", *LAYERS)
DEFAULT_METHODS = ("hap", "hap+implant", "l1", "taylor", "random", "3d", "scc", "psconv")
# The CompareConfig fields that change the model of every entry (of its kind), so results made
# with other values must not share a table. Left out: targets and methods (adding them to a
# folder is what resuming is for), and what only changes measurement or labels (latency
# repeats, ONNX export, quick).
IDENTITY = ("finetune_epochs", "finetune_lr", "train_subset", "score_images", "probes", "seed", "samples",
            "scc_groups", "scc_overlap", "psconv_pattern")
LATENCY_IDENTITY = ("budget", "runtime", "threads", "latency_batch", "latency_table")  # with --target-latency only
# Identity fields that comparisons made before they existed did not record: each joins the
# identity only when it differs from this default, so such a folder still resumes.
LATER_IDENTITY = {"hessian": HAP_ESTIMATOR, "distill": False, "distill_temperature": DEFAULT_TEMPERATURE,
                  "distill_weight": DEFAULT_WEIGHT}
RUNTIME_KEYS = {"torch": "torch", "onnxruntime": "onnx", "openvino": "openvino"}  # runtime -> its key in latency_ms
TIMED_BATCHES = (1, 64)
ENTRY_BATCH = 128  # every entry's batch size


def _targets(values: Any, name: str) -> tuple:
    if isinstance(values, str) or not isinstance(values, (tuple, list)):
        raise LeanconvError(f"{name} takes a list of budgets, e.g. (0.5, 0.33); got {values!r}")
    if not values:
        raise LeanconvError(f"{name} needs at least one budget, e.g. 0.5,0.33")
    for value in values:
        checks.fraction(value, name)
    return values


def parse_budgets(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _words(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


@dataclass(frozen=True)
class CompareConfig(RunConfig):
    """What ``leanconv compare`` runs. Every entry gets ``finetune_epochs`` of fine-tuning."""

    command = "compare"

    targets: tuple[float, ...] = setting((0.5,), lambda c: "--target-latency" if c.budget == "latency" else
                                         "--target-flops", always=True, parse=parse_budgets, cli=False,
                                         metavar="R[,R...]",
                                         help="budgets as fractions of the original MACs (--target-flops) or of "
                                         "its latency measured on --runtime (--target-latency)")
    budget: str = setting("macs", check=lambda v, n: checks.one_of(v, n, ("macs", "latency")), implied=True)
    methods: tuple[str, ...] = setting(DEFAULT_METHODS, "--methods", always=True, parse=_words, metavar="M[,M...]",
                                       help=f"comma-separated, from: {', '.join(CONTENDERS)}")
    finetune_epochs: int = finetune_epochs(1, "fine-tuning epochs of every entry")
    finetune_lr: float = finetune_lr()
    probes: int = probes(32)
    hessian: str = hessian(HAP_ESTIMATOR, "; for the hap, hap+implant and 3d entries (3-D pruning cuts width "
                           "with hap)")
    # recovery (runs/recovery.py): the width and layer entries distil from the baseline while fine-tuning
    distill: bool = recovery.distill(" (width and layer entries; 3d entries fine-tune at their reduced resolution "
                                     "without a teacher)")
    distill_temperature: float = recovery.distill_temperature()
    distill_weight: float = recovery.distill_weight()
    reconstruct_images: int = recovery.reconstruct_images()
    score_images: int = score_images()
    train_subset: int | None = train_subset(help="fine-tune every entry on the first N training images only (the 3d "
                                                 "entry: its samples; its chosen model uses all)")
    samples: int = setting(6, "--samples", check=lambda v, n: checks.whole(v, n, at_least=4), metavar="N",
                           help="3-D pruning samples")
    latency_repeats: int = latency_repeats()
    runtime: str = runtime()
    threads: int = threads()
    latency_batch: int = latency_batch()
    latency_table: str | None = latency_table()
    onnx: bool = setting(True, "--no-onnx", help="skip ONNX export and ONNX Runtime latency (unless it is --runtime)")
    onnx_opset: int | None = setting(None, "--onnx-opset", metavar="N",
                                     check=lambda v, n: v if v is None else checks.one_of(v, n, OPSETS),
                                     help="ONNX opset to export (default: torch's exporter's own, 18 or newer; "
                                     "below 18 the faster TorchScript exporter is used)")
    quick: bool = setting(False, "--quick", help="label the report as a quick run with tiny budgets")
    seed: int = seed()
    scc_groups: int = setting(2, "--scc-groups", check=lambda v, n: checks.whole(v, n, at_least=1), metavar="G",
                              help="channel groups of the scc entry")
    scc_overlap: float = setting(0.5, "--scc-overlap", check=lambda v, n: checks.number(v, n, at_least=0, below=1),
                                 metavar="O", help="window overlap of the scc entry")
    psconv_pattern: str = setting("psd4_p8", "--psconv-pattern", check=lambda v, n: checks.one_of(v, n, PATTERNS),
                                  choices=tuple(sorted(PATTERNS)), help="kernel pattern of the psconv entry")

    def check(self) -> None:
        if isinstance(self.targets, (int, float)) and not isinstance(self.targets, bool):
            object.__setattr__(self, "targets", (self.targets,))  # one budget
        _targets(self.targets, "--target-flops")
        recovery.check_settings(self)
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", _words(self.methods))  # "l1,scc" as on the command line
        if not self.methods:
            raise LeanconvError(f"no methods to compare; pass --methods with one or more of: {', '.join(CONTENDERS)}")
        unknown = [m for m in self.methods if m not in CONTENDERS]
        if unknown:
            raise LeanconvError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(CONTENDERS)}")
        # a repeated method or budget would run twice under one entry key: keep the first of each
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        object.__setattr__(self, "targets", _distinct_targets(tuple(self.targets)))
        if self.latency_table is not None and self.budget != "latency":
            raise LeanconvError("--latency-table is for --target-latency; drop it or give latency targets")
        if self.budget == "latency":
            flat = [m for m in self.methods if m in WIDTH and WIDTH[m][1] > 0]
            if flat:
                raise LeanconvError(f"{', '.join(flat)} has no latency budget (Neural Implant is pruned to MACs); "
                                    "drop it from --methods or use --target-flops")

    def runtimes(self) -> tuple[str, ...]:
        """The runtimes every model is timed on: PyTorch, ONNX Runtime (unless --no-onnx) and
        the budget's runtime."""
        return tuple(dict.fromkeys(("torch", *(("onnxruntime",) if self.onnx else ()), self.runtime)))


    def run(self, source: Source, **kwargs: Any) -> Path:
        return run_compare(self, source, **kwargs)


def _distinct_targets(targets: tuple[float, ...]) -> tuple[float, ...]:
    """``targets`` without repeats; two different values that name the same entry key are an error."""
    seen: dict[str, float] = {}
    for target in targets:
        first = seen.setdefault(f"{target:g}", target)
        if first != target:
            raise LeanconvError(f"targets {first!r} and {target!r} would share the entry name @{target:g}; "
                                "give budgets that differ in their first 6 significant digits")
    return tuple(seen.values())


def entry_keys(config: CompareConfig) -> list[tuple[str, str, float | None]]:
    """(key, method, target) of every entry the config asks for, in run order."""
    keys = []
    for target in config.targets:
        keys += [(f"{m}@{target:g}", m, target) for m in config.methods if m not in LAYERS]
    keys += [(m, m, None) for m in config.methods if m in LAYERS]
    return keys


def entry_config(c: CompareConfig, method: str, target: float | None) -> RunConfig:
    """The run config of one entry: the comparison's fine-tuning, data and probe settings."""
    if method in WIDTH:
        criterion, implant = WIDTH[method]
        kind = {"kind": "latency", "runtime": c.runtime, "threads": c.threads, "latency_batch": c.latency_batch,
                "latency_table": c.latency_table} if c.budget == "latency" else {}
        return PruneConfig(method=criterion, target=target, implant=implant, finetune_epochs=c.finetune_epochs,
                           finetune_lr=c.finetune_lr, score_images=c.score_images, probes=c.probes, seed=c.seed,
                           train_subset=c.train_subset, batch_size=ENTRY_BATCH, latency_repeats=c.latency_repeats,
                           hessian=c.hessian, reconstruct_images=c.reconstruct_images, **_distillation(c), **kind)
    if method == "3d":  # its final fine-tuning uses the whole training split; a train subset caps the samples'
        images = min(c.train_subset, 2000) if c.train_subset is not None else 2000
        kind = {"kind": "latency", "runtime": c.runtime, "runtime_threads": c.threads,
                "latency_batch": c.latency_batch} if _latency_3d(c) else {}
        return Prune3dConfig(target=target, samples=c.samples, sample_epochs=1, sample_images=images,
                             finetune_epochs=c.finetune_epochs, finetune_lr=c.finetune_lr, score_images=c.score_images,
                             probes=c.probes, hessian=c.hessian, seed=c.seed, latency_repeats=2,
                             reconstruct_images=c.reconstruct_images,
                             batch_size=ENTRY_BATCH, **kind)
    shape = {"groups": c.scc_groups, "overlap": c.scc_overlap} if method == "scc" else {"pattern": c.psconv_pattern}
    # the new layers start fitted to the trained ones (convert's --init auto): the comparison's fine-tuning rate
    return ConvertConfig(to=method, **shape, seed=c.seed, finetune_epochs=c.finetune_epochs,
                         finetune_lr=c.finetune_lr, train_subset=c.train_subset, batch_size=ENTRY_BATCH,
                         **_distillation(c))


def _distillation(c: CompareConfig) -> dict[str, Any]:
    """The distillation settings a width or layer entry takes (none without ``--distill``)."""
    if not c.distill:
        return {}
    return {"distill": True, "distill_temperature": c.distill_temperature, "distill_weight": c.distill_weight}


def _latency_3d(c: CompareConfig) -> bool:
    """Whether the ``3d`` entries take the latency budget: yes, unless the table comes from a file
    (3-D pruning measures each sample's layer configurations on this machine's runtime)."""
    return c.budget == "latency" and c.latency_table is None


def _notes(c: CompareConfig, method: str, config: RunConfig, result: Result) -> tuple[str, str, str]:
    """(family, label, notes) of an entry."""
    record = result.record.to_dict()
    if method in WIDTH:
        notes = f"{config.method} scores, MACs x{record['achieved']['macs']:.3f}"
        if c.budget == "latency":
            last = final_attempt(record["latency_budget"]["attempts"])
            measured = last["measured"]["median"] if last["measured"] else None
            notes += (f"; solved for {c.runtime} latency x{config.target:g} (batch {c.latency_batch}), predicted "
                      f"x{last['predicted']:.3f}" + (f", measured x{measured:.3f}" if measured is not None else ""))
        return "width", method, notes + _distilled(c)
    if method == "3d":
        choice = record["choice"]["realised"]
        notes = (f"d={choice.get('d', float('nan')):.2f} w={choice.get('w', float('nan')):.2f} "
                 f"side={choice.get('side', '?')}; {c.samples} samples")
        if c.train_subset is not None:
            notes += f"; final fine-tuning on all training images (train subset {c.train_subset}: sampling only)"
        if _latency_3d(c):
            last = record["latency_budget"]["attempts"][-1]
            notes += (f"; solved for {c.runtime} latency x{config.target:g} (batch {c.latency_batch}), predicted "
                      f"x{last['predicted']:.3f}, measured x{last['measured']['median']:.3f}")
        elif c.budget == "latency":
            notes += (f"; solved for MACs x{config.target:g}: a latency table from another device cannot time "
                      "3-D pruning's samples here")
        return "3d", method, notes
    label = f"scc g={c.scc_groups} o={c.scc_overlap:g}" if method == "scc" else f"psconv {c.psconv_pattern}"
    fitted = record.get("converted", {}).get("test_accuracy")
    start = "fitted to the trained ones" if record.get("init") == "fit" else "drawn at random"
    notes = (f"new layers {start}" + (f" ({fitted:.2f}% before fine-tuning)" if fitted is not None else "")
             + f", then trained {c.finetune_epochs} epochs at lr {record.get('finetune_lr', config.finetune_lr):g}; "
             "other weights from the baseline; BatchNorm statistics then re-estimated")
    return "layer", label, notes + _distilled(c)


def _distilled(c: CompareConfig) -> str:
    """What an entry's notes add when it was fine-tuned with distillation."""
    if not c.distill:
        return ""
    return f"; fine-tuned with distillation from the baseline (T={c.distill_temperature:g}, A={c.distill_weight:g})"


@dataclass
class _Context:
    source: Source
    config: CompareConfig
    out: Path
    command: str
    progress: Progress | None = None
    _baseline_model: nn.Module | None = None

    _prepared: dict = field(default_factory=dict)

    def baseline(self) -> nn.Module:
        """The unpruned model every entry is timed against (loaded once)."""
        if self._baseline_model is None:
            self._baseline_model = self.source.fresh()
        return self._baseline_model

    def prepared_baseline(self, runtime: str, batch: int) -> Prepared:
        """The baseline made ready on ``runtime`` at ``batch`` (once per comparison)."""
        if (runtime, batch) not in self._prepared:
            self._prepared[runtime, batch] = prepare(self.baseline(), self.source.shape, runtime=runtime,
                                                     threads=self.config.threads, batch=batch)
        return self._prepared[runtime, batch]


def _timed(model: nn.Module, shape, ctx: _Context) -> tuple[dict, dict]:
    """``model`` timed side by side with the baseline (interleaved rounds) on every runtime of
    the comparison at batch 1, 64 and the budget's batch: ``latency_ms[runtime key][batchB]``
    (the model's median ms) and ``speedup[runtime key][batchB]`` (the baseline's time over the
    model's: median over rounds, lowest and highest round). The baseline alone when ``model``
    is None."""
    c = ctx.config
    shapes = {"baseline": ctx.source.shape, "model": shape}
    latency: dict[str, dict] = {}
    speedup: dict[str, dict] = {}
    for rt in c.runtimes():
        key = RUNTIME_KEYS[rt]
        latency[key], speedup[key] = {}, {}
        for batch in dict.fromkeys((*TIMED_BATCHES, c.latency_batch)):
            base = ctx.prepared_baseline(rt, batch)
            models = {"baseline": base} if model is None else {"baseline": base, "model": model}
            sbs = time_side_by_side(models, {n: shapes[n] for n in models}, runtime=rt, threads=c.threads,
                                    batch=batch, rounds=5, repeats=c.latency_repeats, warmup=3)
            name = "model" if model is not None else "baseline"
            latency[key][f"batch{batch}"] = sbs.latency_ms[name]["median_ms"]
            speedup[key][f"batch{batch}"] = sbs.speedup[name]
    latency.setdefault("onnx", None)
    return latency, speedup


def _measured(model: nn.Module, ctx: _Context, folder: Path, *, baseline: bool = False) -> dict[str, Any]:
    """Accuracy, counted cost, channels and latency of ``model`` (timed side by side with the
    baseline, :func:`_timed`), at the input shape the model records (3-D pruning may have
    changed the resolution). With ``onnx`` the model is also exported (output checked)."""
    shape = tuple(getattr(model, "leanconv_meta", {}).get("input_shape") or ctx.source.shape)
    data = ctx.source.data
    resolution = None if shape[-1] == data.image_size else shape[-1]
    cost = count(model, shape)
    test = data.loader("test", 256, resolution=resolution)
    if ctx.config.onnx:
        export_onnx(model, shape, folder / "model.onnx", opset=ctx.config.onnx_opset, latency=False)
    latency, speedup = _timed(None if baseline else model, shape, ctx)
    return {"accuracy": evaluate(model, test)["accuracy"], "params": cost.params, "macs": cost.macs,
            "latency_ms": latency, "speedup": speedup,
            "channels": {name: after for name, (_, after) in channel_counts(model).items()}}


def _baseline(ctx: _Context) -> dict[str, Any]:
    model = ctx.source.fresh()
    folder = ctx.out / "entries" / "baseline"
    folder.mkdir(parents=True, exist_ok=True)
    base = model.leanconv_base.get("zoo") or model.leanconv_base.get("constructor")
    c = ctx.config
    return {"kind": "baseline", "label": "baseline", "model": str(base), "dataset": ctx.source.data.name,
            "input_shape": list(ctx.source.shape), "checkpoint": ctx.source.describe(), "command": ctx.command,
            "quick": c.quick, "threads": c.threads, "timing": _timing_setting(c),
            **_measured(model, ctx, folder, baseline=True)}


def _timing_setting(c: CompareConfig) -> dict[str, Any]:
    """How every latency of the comparison was measured (the report states it)."""
    from leanconv.cost.hardware import cpu_name
    from leanconv.cost.runtimes import runtime_version

    return {"runtime": c.runtime, "runtime_key": RUNTIME_KEYS[c.runtime], "batch": c.latency_batch,
            "threads": c.threads, "cpu": cpu_name(), "budget": c.budget, "method": "side by side, 5 interleaved "
            f"rounds of {c.latency_repeats} calls per model and batch",
            "versions": {rt: runtime_version(rt) for rt in c.runtimes()}}


def _sensitivity(ctx: _Context) -> dict[str, Any]:
    c = ctx.config
    config = SensitivityConfig(probes=c.probes, score_images=c.score_images, seed=c.seed, batch_size=ENTRY_BATCH)
    details = config.run(ctx.source, cache_dir=ctx.out / "cache").record.details
    return {"kind": "sensitivity", "layers": {n.removesuffix(".weight"): v["sensitivity"]
                                              for n, v in details["layers"].items()},
            "probes": details["probes"], "images": details["images"]}


def _run_entry(ctx: _Context, key: str, method: str, target: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    folder = ctx.out / "entries" / key
    config = entry_config(ctx.config, method, target)
    result = config.run(ctx.source, out=folder, progress=ctx.progress, measured=False)  # measured below, alike
    family, label, notes = _notes(ctx.config, method, config, result)
    model = result.model
    model.leanconv_meta = {**getattr(model, "leanconv_meta", {}), "compare": {"key": key, "method": method}}
    result.save(folder, constructor=ctx.source.constructor)
    record = {"kind": "entry", "key": key, "label": label, "target": target, "family": family,
              "budget": ctx.config.budget if family == "width" else
              (("latency" if _latency_3d(ctx.config) else "macs") if family == "3d" else None),
              "finetune_epochs": ctx.config.finetune_epochs, "checkpoint": str(folder / "model.safetensors"),
              "command": result.record.command, "notes": notes, **_measured(model, ctx, folder)}
    record["seconds"] = time.perf_counter() - t0
    return record


def _identity(ctx: _Context) -> dict[str, Any]:
    """What a results file's records must share (module docstring), as it reads back from JSON."""
    source = ctx.source
    identity = {"checkpoint_sha256": file_sha256(source.checkpoint), "dataset": source.data.name,
                "data_dir": None if source.data_dir is None else str(Path(source.data_dir).resolve()),
                "input_shape": list(source.shape), "resolution": source.resolution,
                **{name: getattr(ctx.config, name) for name in IDENTITY},
                **{name: getattr(ctx.config, name) for name, default in LATER_IDENTITY.items()
                   if getattr(ctx.config, name) != default}}
    if ctx.config.budget == "latency":
        identity.update({name: getattr(ctx.config, name) for name in LATENCY_IDENTITY})
    return json.loads(json.dumps(identity))


def _shown(key: str, value: Any) -> str:
    return value[:12] if key == "checkpoint_sha256" and isinstance(value, str) else json.dumps(value)


def _run_record(ctx: _Context, have: dict[str, Any] | None, results: Path) -> dict[str, Any] | None:
    """The ``run`` record to write first (None when ``have`` holds a matching one); raises,
    naming every difference, when ``results`` was made under another identity. A file from
    before run records (none in it) adopts this run's identity: its records cannot be checked,
    and refusing them would break resuming an older comparison."""
    identity = _identity(ctx)
    if have is None or have["run"] is None:
        return {"kind": "run", "identity": identity, "checkpoint": ctx.source.describe(), "adopted": have is not None}
    old = have["run"]["identity"]
    differ = [k for k in {**old, **identity} if old.get(k) != identity.get(k)]
    if differ:
        what = "; ".join(f"{k} {_shown(k, old.get(k))} there, {_shown(k, identity.get(k))} now" for k in differ)
        raise LeanconvError(f"{results} was made by a different comparison ({what}); its entries would not be "
                            "comparable: use a new --out folder (or delete this one to start over)")
    return None


def _preflight(ctx: _Context, entries: list[tuple[str, str, float | None]]) -> None:
    """Refuse, before anything is written, an entry that would fail on this model: a budget
    the channel floors cannot reach, a 3-D budget outside its search box, a conversion the
    layers do not allow (groups that do not divide a layer's channels)."""
    model, shape = ctx.source.fresh(), ctx.source.shape
    checked: dict[float | None, bool] = {}
    for key, method, target in entries:
        config = entry_config(ctx.config, method, target)
        try:
            if method in WIDTH:
                if config.kind == "latency" and checked.get(target):
                    continue  # one latency check per target: the table and calibration do not depend on the method
                config.check_target(model, torch.zeros(1, *shape), shape)  # what run_prune checks first
                checked[target] = True
            elif method == "3d":
                check_box(config, ctx.source, ctx.source.checkpoint)
            else:
                spec = config.spec()
                with torch.random.fork_rng(devices=[]):
                    convert(copy.deepcopy(model), spec.to, groups=spec.groups, overlap=spec.overlap,
                            pattern=spec.pattern)
        except LeanconvError as exc:
            raise type(exc)(f"entry {key}: {exc}") from None  # the kind kept: the demo retries an unreachable one


def run_compare(config: CompareConfig, source: Source, *, out: str | Path, command: str | None = None,
                progress: Progress | None = None, stage=None) -> Path:
    """Run every entry of ``config`` not yet in ``out/results.jsonl``; returns that file's path
    (:func:`leanconv.report.build.build_report` turns it into the report). Refuses, before
    writing anything, a folder made with another checkpoint, data or settings, and an entry
    that would fail on this model. ``command`` is what the baseline row names as the command
    behind the table (default: the compare command). ``stage(done, total, key)`` is called
    before each step (for an overall progress line)."""
    if source.checkpoint is None:
        raise LeanconvError("compare starts from a checkpoint file (every entry reloads it and the results "
                            "name it); save the model with leanconv.save first")
    out = Path(out)
    ctx = _Context(source, config, out, command or command_line(config, source, out), progress=progress)
    results = out / "results.jsonl"
    have = read_results(results, require_baseline=False) if results.exists() else None
    run = _run_record(ctx, have, results)
    done_keys = {e["key"] for e in (have or {}).get("entries", [])}
    entries = [k for k in entry_keys(config) if k[0] not in done_keys]
    _preflight(ctx, entries)
    out.mkdir(parents=True, exist_ok=True)
    if run is not None:
        append_result(results, run)
    steps = [("baseline", None, None)] * (have is None or have["baseline"] is None)
    steps += [("sensitivity", None, None)] * (have is None or have["sensitivity"] is None)
    steps += entries
    for i, (key, method, target) in enumerate(steps):
        if stage:
            stage(i, len(steps), key)
        if key == "baseline":
            record = _baseline(ctx)
        elif key == "sensitivity":
            record = _sensitivity(ctx)
        else:
            record = _run_entry(ctx, key, method, target)
        append_result(results, record)
        log.info("compare: %s done", key)
    if stage:
        stage(len(steps), len(steps), "done")
    return results
