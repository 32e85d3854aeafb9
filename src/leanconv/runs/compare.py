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
``leanconv.report.build.build_report`` turns the file into ``report.html`` / ``report.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cost import count, measure_fastest_layout
from leanconv.data.splits import DatasetSplits
from leanconv.errors import LeanconvError
from leanconv.deploy.onnx import export_onnx
from leanconv.prune.channels import channel_counts
from leanconv.runs.prune import PruneConfig, run_pruning, scoring_batches
from leanconv.runs.results import append_result, read_results
from leanconv.train import evaluate
from leanconv.util.progress import Progress

__all__ = ["CompareConfig", "run_compare", "CONTENDERS", "IDENTITY", "entry_keys"]

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


@dataclass(frozen=True)
class CompareConfig:
    """What ``leanconv compare`` runs. Every entry gets ``finetune_epochs`` of fine-tuning."""

    targets: tuple[float, ...] = (0.5,)
    methods: tuple[str, ...] = DEFAULT_METHODS
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    probes: int = 32  # Hutchinson probe cap for hap
    score_images: int = 512
    train_subset: int | None = None  # fine-tune on this many training images (quick runs)
    samples: int = 6  # 3-D pruning: samples to collect
    latency_repeats: int = 10
    onnx: bool = True
    onnx_opset: int | None = None  # None: torch's dynamo exporter; < 18: the faster TorchScript one
    quick: bool = False
    seed: int = 0
    scc_groups: int = 2
    scc_overlap: float = 0.5
    psconv_pattern: str = "psd4_p8"

    def __post_init__(self) -> None:
        if not self.methods:
            raise LeanconvError(f"no methods to compare; pass --methods with one or more of: {', '.join(CONTENDERS)}")
        unknown = [m for m in self.methods if m not in CONTENDERS]
        if unknown:
            raise LeanconvError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(CONTENDERS)}")
        if not self.targets or any(not 0.0 < t < 1.0 for t in self.targets):
            raise LeanconvError(f"every target must lie strictly between 0 and 1, got {list(self.targets)}")
        if self.finetune_epochs < 0:
            raise LeanconvError(f"fine-tuning epochs must be >= 0, got {self.finetune_epochs}")
        # a repeated method or budget would run twice under one entry key: keep the first of each
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        object.__setattr__(self, "targets", _distinct_targets(self.targets))


def _distinct_targets(targets: tuple[float, ...]) -> tuple[float, ...]:
    """``targets`` without repeats; two different values that name the same entry key are an error."""
    seen: dict[str, float] = {}
    for target in targets:
        first = seen.setdefault(f"{target:g}", target)
        if first != target:
            raise LeanconvError(f"targets {first!r} and {target!r} would share the entry name @{target:g}; "
                                "give budgets that differ in their first 6 significant digits")
    return tuple(seen.values())


@dataclass
class _Context:
    ckpt: Path
    data: DatasetSplits
    shape: tuple[int, int, int]
    resolution: int | None
    config: CompareConfig
    out: Path
    command: str
    constructor: str | None = None
    progress: Progress | None = None
    data_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def fresh_model(self) -> nn.Module:
        return checkpoint.load(self.ckpt, constructor=self.constructor)

    def data_args(self) -> list[str]:
        """``--data`` (and ``--data-dir``) for the commands that reproduce an entry."""
        return ["--data", self.data.name, *(["--data-dir", str(self.data_dir)] if self.data_dir is not None else [])]

    def constructor_args(self) -> list[str]:
        return ["--constructor", self.constructor] if self.constructor else []


def entry_keys(config: CompareConfig) -> list[tuple[str, str, float | None]]:
    """(key, method, target) of every entry the config asks for, in run order."""
    keys = []
    for target in config.targets:
        keys += [(f"{m}@{target:g}", m, target) for m in config.methods if m not in LAYERS]
    keys += [(m, m, None) for m in config.methods if m in LAYERS]
    return keys


def _latency(model: nn.Module, shape, repeats: int) -> dict[str, float]:
    """Median ms per batch in the model's faster memory layout (NCHW or channels_last)."""
    return {f"batch{b}": measure_fastest_layout(model, shape, b, repeats=repeats, warmup=3).median_ms for b in (1, 64)}


def _measured(model: nn.Module, ctx: _Context, folder: Path) -> dict[str, Any]:
    """Accuracy, counted cost, latency (PyTorch and ONNX Runtime) and channels of ``model``, at
    the input shape the model records (3-D pruning may have changed the resolution)."""
    shape = tuple(getattr(model, "leanconv_meta", {}).get("input_shape") or ctx.shape)
    resolution = None if shape[-1] == ctx.data.image_size else shape[-1]
    cost = count(model, shape)
    test = ctx.data.loader("test", 256, resolution=resolution)
    onnx = None
    if ctx.config.onnx:
        info = export_onnx(model, shape, folder / "model.onnx", opset=ctx.config.onnx_opset,
                           repeats=ctx.config.latency_repeats, warmup=3)
        onnx = {k: v["median_ms"] for k, v in info["latency_ms"].items()}
    return {"accuracy": evaluate(model, test)["accuracy"], "params": cost.params, "macs": cost.macs,
            "latency_ms": {"torch": _latency(model, shape, ctx.config.latency_repeats), "onnx": onnx},
            "channels": {name: after for name, (_, after) in channel_counts(model).items()}}


def _baseline(ctx: _Context) -> dict[str, Any]:
    model = ctx.fresh_model()
    folder = ctx.out / "entries" / "baseline"
    folder.mkdir(parents=True, exist_ok=True)
    base = model.leanconv_base.get("zoo") or model.leanconv_base.get("constructor")
    return {"kind": "baseline", "label": "baseline", "model": str(base), "dataset": ctx.data.name,
            "input_shape": list(ctx.shape), "checkpoint": str(ctx.ckpt), "command": ctx.command,
            "quick": ctx.config.quick, "threads": torch.get_num_threads(), **_measured(model, ctx, folder)}


def _sensitivity(ctx: _Context) -> dict[str, Any]:
    from leanconv.importance.hessian import cached_channel_traces

    model = ctx.fresh_model()
    batches = scoring_batches(ctx.data, ctx.config.score_images, 128, ctx.resolution)
    result = cached_channel_traces(model, batches, ctx.out / "cache", max_probes=ctx.config.probes,
                                   min_probes=min(8, ctx.config.probes), seed=ctx.config.seed)
    sens = result.hap_sensitivity(model)
    return {"kind": "sensitivity", "layers": {n.removesuffix(".weight"): float(v.sum()) for n, v in sens.items()},
            "probes": result.probes, "images": sum(len(y) for _, y in batches)}


def _width_entry(ctx: _Context, key: str, method: str, target: float) -> tuple[nn.Module, dict[str, Any]]:
    criterion, implant = WIDTH[method]
    c = ctx.config
    model = ctx.fresh_model()
    config = PruneConfig(method=criterion, target=target, implant=implant, finetune_epochs=c.finetune_epochs,
                         finetune_lr=c.finetune_lr, score_images=c.score_images, probes=c.probes, seed=c.seed,
                         latency_repeats=2, train_subset=c.train_subset)
    record = run_pruning(model, ctx.data, ctx.shape, config, resolution=ctx.resolution, progress=ctx.progress,
                         measured=False)  # compare measures every entry itself
    args = ["leanconv", "prune", str(ctx.ckpt), *ctx.constructor_args(), "--method", criterion,
            "--target-flops", f"{target:g}", "--finetune-epochs", str(c.finetune_epochs),
            "--finetune-lr", f"{c.finetune_lr:g}",
            *(["--train-subset", str(c.train_subset)] if c.train_subset is not None else []),
            "--probes", str(c.probes), "--score-images", str(c.score_images), "--seed", str(c.seed),
            *ctx.data_args(), "--out", str(ctx.out / "entries" / key)]
    if implant:
        args += ["--implant", f"{implant:g}"]
    notes = f"{criterion} scores, MACs x{record['achieved']['macs']:.3f}"
    return model, {"family": "width", "command": shlex.join(args), "notes": notes}


def _runner(method: str) -> Callable[..., tuple[nn.Module, dict[str, Any]]]:
    if method in WIDTH:
        return _width_entry
    from leanconv.runs import compare_extra  # 3-D and layer variants

    return compare_extra.runner(method)


def _run_entry(ctx: _Context, key: str, method: str, target: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, info = _runner(method)(ctx, key, method, target)
    folder = ctx.out / "entries" / key
    folder.mkdir(parents=True, exist_ok=True)
    model.leanconv_meta = {**getattr(model, "leanconv_meta", {}), "compare": {"key": key, "method": method}}
    checkpoint.save(model, folder / "model.safetensors", constructor=ctx.constructor)
    record = {"kind": "entry", "key": key, "label": method if method not in LAYERS else info.pop("label", method),
              "target": target, "finetune_epochs": ctx.config.finetune_epochs,
              "checkpoint": str(folder / "model.safetensors"), **info, **_measured(model, ctx, folder)}
    record["seconds"] = time.perf_counter() - t0
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(ctx: _Context) -> dict[str, Any]:
    """What a results file's records must share (module docstring), as it reads back from JSON."""
    identity = {"checkpoint_sha256": _sha256(ctx.ckpt), "dataset": ctx.data.name,
                "data_dir": None if ctx.data_dir is None else str(Path(ctx.data_dir).resolve()),
                "input_shape": list(ctx.shape), "resolution": ctx.resolution,
                **{name: getattr(ctx.config, name) for name in IDENTITY}}
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
        return {"kind": "run", "identity": identity, "checkpoint": str(ctx.ckpt), "adopted": have is not None}
    old = have["run"]["identity"]
    differ = [k for k in {**old, **identity} if old.get(k) != identity.get(k)]
    if differ:
        what = "; ".join(f"{k} {_shown(k, old.get(k))} there, {_shown(k, identity.get(k))} now" for k in differ)
        raise LeanconvError(f"{results} was made by a different comparison ({what}); its entries would not be "
                            "comparable: use a new --out folder (or delete this one to start over)")
    return None


def run_compare(ckpt: str | Path, data: DatasetSplits, shape: tuple[int, int, int], out: str | Path,
                config: CompareConfig, *, resolution: int | None = None, command: str = "",
                constructor: str | None = None, data_dir: str | None = None, progress: Progress | None = None,
                stage: Callable[[int, int, str], None] | None = None) -> Path:
    """Run every entry of ``config`` not yet in ``out/results.jsonl``; returns that file's path.
    Refuses, before writing anything, a folder made with another checkpoint, data or settings.
    ``stage(done, total, key)`` is called before each step (for an overall progress line)."""
    out = Path(out)
    ctx = _Context(Path(ckpt), data, shape, resolution, config, out, command, constructor=constructor,
                   progress=progress, data_dir=data_dir)
    results = out / "results.jsonl"
    have = read_results(results, require_baseline=False) if results.exists() else None
    run = _run_record(ctx, have, results)
    out.mkdir(parents=True, exist_ok=True)
    if run is not None:
        append_result(results, run)
    done_keys = {e["key"] for e in (have or {}).get("entries", [])}
    steps = [("baseline", None, None)] * (have is None or have["baseline"] is None)
    steps += [("sensitivity", None, None)] * (have is None or have["sensitivity"] is None)
    steps += [k for k in entry_keys(config) if k[0] not in done_keys]
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

