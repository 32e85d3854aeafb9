"""Design-space exploration of the new convolutions: train every variant, count, measure.

DSXplore (Wang et al., IPDPS 2021) sweeps the channel groups ``g`` in {1, 2, 4, 8} and the
overlap ``o`` in {0.25, 0.33, 0.5, 0.75} of its sliding-channel convs; pSConv (Kundu et al.,
2020) compares periodic kernel patterns. :func:`run_explore` builds each variant of one zoo
model (converted by :func:`leanconv.convs.convert.convert`; optionally the dense model too), trains
it from scratch with the shared loop (:func:`leanconv.train.fit`) for the same short budget,
and records the test accuracy, parameters and MACs (counted, one image) and the median
latency per batch (eager PyTorch, batch 1 and 64 by default, measured right after training,
so load from other processes shows up in it). :func:`time_variants` then times every
finished variant side by side with the dense model (interleaved rounds, on each of
``runtimes`` at each latency batch): the speedups the table and ``explore.json`` report.

Files in the output folder:

* ``results.jsonl``: one JSON line per finished variant, append-only. A variant with a line
  is never trained again, so an interrupted exploration resumes where it stopped; a variant
  interrupted mid-training resumes from its last finished epoch. Every line carries the
  budget (model, data, training config) and a run with another budget is refused.
* ``variants/<name>/``: the training folder of each variant (``model.safetensors``, ...).
* ``explore.json`` (configuration, every record, the Pareto front, the side-by-side
  ``speed``) and ``table.md``, written by :func:`write_summary` from all lines of
  ``results.jsonl`` and the timing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from leanconv import checkpoint
from leanconv.convs.convert import ConversionSpec, convert
from leanconv.cost import count, measure_latency
from leanconv.cost.runtimes import check_runtime
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.data import load_dataset
from leanconv.data.splits import DatasetSplits
from leanconv.errors import LeanconvError
from leanconv.layers.periodic_sparse import PATTERNS
from leanconv.models import build, names
from leanconv.train import TrainConfig, evaluate, fit
from leanconv.util.files import JsonlStore, write_json, write_text
from leanconv.util.model_io import check_classes
from leanconv.util.progress import Progress

__all__ = ["ExploreConfig", "Variant", "variants", "build_variant", "run_explore", "time_variants", "load_results",
           "pareto_front", "markdown_table", "write_summary"]

log = logging.getLogger(__name__)
PAPER_OVERLAPS = (0.25, 0.33, 0.5, 0.75)


@dataclass(frozen=True)
class ExploreConfig:
    """The grid and the shared budget of one exploration."""

    model: str = "resnet20"
    dataset: str = "fashion-mnist"  # a name for leanconv.data.load_dataset, options allowed
    data_dir: str | None = None
    scc_groups: tuple[int, ...] = ()  # one SCC variant per (groups, overlap) pair
    scc_overlaps: tuple[float, ...] = PAPER_OVERLAPS
    psconv_patterns: tuple[str, ...] = ()
    include_dense: bool = False  # also train the unconverted model, the reference point
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3))
    batch_size: int = 128
    subset: int | None = None  # train on this many images only (quick runs)
    augment: bool = True
    latency_batches: tuple[int, ...] = (1, 64)
    latency_repeats: int = 10
    runtimes: tuple[str, ...] = ("torch", "onnxruntime")  # where the variants are timed against dense
    timing_rounds: int = 5

    def __post_init__(self) -> None:
        if self.model not in names() and ":" not in self.model:
            raise LeanconvError(f"explore needs a zoo model ({', '.join(names())}) or package.module:function, "
                                f"got {self.model!r}")
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.scc_groups):
            raise LeanconvError(f"SCC groups must be positive whole numbers, got {list(self.scc_groups)}")
        if self.scc_groups and not self.scc_overlaps:
            raise LeanconvError("SCC groups were given without any overlap; give overlaps in [0, 1)")
        if any(not 0 <= o < 1 for o in self.scc_overlaps):
            raise LeanconvError(f"SCC overlaps must lie in [0, 1), got {list(self.scc_overlaps)}")
        unknown = [p for p in self.psconv_patterns if p not in PATTERNS]
        if unknown:
            raise LeanconvError(f"unknown pSConv pattern(s) {', '.join(unknown)}; choose from {', '.join(PATTERNS)}")
        if not (self.scc_groups or self.psconv_patterns or self.include_dense):
            raise LeanconvError("nothing to explore: give SCC groups, pSConv patterns or include the dense model")
        if self.batch_size < 1 or self.latency_repeats < 1 or any(b < 1 for b in self.latency_batches):
            raise LeanconvError("batch size, latency batches and latency repeats must be positive")
        if self.timing_rounds < 1:
            raise LeanconvError("timing rounds must be positive")
        for name in self.runtimes:
            check_runtime(name)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class Variant:
    """One point of the design space; ``spec`` is None for the dense model."""

    name: str
    kind: str  # "dense", "scc" or "psconv"
    spec: ConversionSpec | None = None


def variants(config: ExploreConfig) -> list[Variant]:
    """The variants of ``config`` in a fixed order: dense, SCC (groups-major), pSConv."""
    found = [Variant("dense", "dense")] if config.include_dense else []
    for groups in config.scc_groups:
        for overlap in config.scc_overlaps:
            spec = ConversionSpec("scc", groups, float(overlap))
            found.append(Variant(spec.name, "scc", spec))
    for pattern in config.psconv_patterns:
        spec = ConversionSpec("psconv", pattern=pattern)
        found.append(Variant(spec.name, "psconv", spec))
    unique = list({v.name: v for v in found}.values())
    return unique


def _input_shape(data: DatasetSplits) -> tuple[int, int, int]:
    return (data.in_channels, data.image_size, data.image_size)


def build_variant(config: ExploreConfig, variant: Variant, data: DatasetSplits) -> nn.Module:
    """The zoo model for ``data``, freshly initialised from the training seed, converted."""
    torch.manual_seed(config.train.seed)
    shape = _input_shape(data)
    model = build(config.model, in_channels=shape[0], input_size=shape[1], num_classes=data.num_classes)
    if variant.spec is not None:
        s = variant.spec
        convert(model, s.to, groups=s.groups, overlap=s.overlap, pattern=s.pattern)
    check_classes(model, shape, data.num_classes)
    model.leanconv_meta = {**getattr(model, "leanconv_meta", {}), "input_shape": list(shape),
                           "num_classes": data.num_classes,
                           "dataset": {"name": data.name, "data_dir": config.data_dir},
                           "explore_variant": variant.name}
    return model


def _budget(config: ExploreConfig, data: DatasetSplits) -> dict[str, Any]:
    """What must be equal for two records to be comparable (and for a record to be reused)."""
    train = {k: v for k, v in asdict(config.train).items() if k != "threads"}
    return json.loads(json.dumps({"model": config.model, "dataset": data.name, "input_shape": _input_shape(data),
                                  "train": train, "batch_size": config.batch_size, "subset": config.subset,
                                  "augment": config.augment}))


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``results.jsonl`` (a torn last line from a crash is skipped with a warning)."""
    return JsonlStore(path).read()


def _loaders(config: ExploreConfig, data: DatasetSplits):
    train = data.loader("train", config.batch_size, shuffle=True, augment=config.augment, seed=config.train.seed,
                        subset=config.subset, drop_last=True)
    return train, data.loader("val", 256), data.loader("test", 256)


def _last_metrics(folder: Path) -> dict[str, Any]:
    rows = JsonlStore(folder / "metrics.jsonl").read()
    return rows[-1] if rows else {}


def _measure(config: ExploreConfig, model: nn.Module, shape: Sequence[int]) -> dict[str, Any]:
    report = count(model, shape)
    latency = {f"batch{b}": measure_latency(model, shape, b, repeats=config.latency_repeats,
                                            threads=config.train.threads).to_dict()
               for b in config.latency_batches}
    return {"params": report.params, "macs": report.macs,
            "latency_ms": {k: v["median_ms"] for k, v in latency.items()}, "latency": latency}


def _run_variant(config: ExploreConfig, variant: Variant, data: DatasetSplits, out: Path, loaders,
                 progress: Progress | None) -> dict[str, Any]:
    folder = out / "variants" / variant.name
    model = build_variant(config, variant, data)
    train, val, test = loaders
    resume = (folder / "train_state.safetensors").exists()
    result = fit(model, train, config.train, val_loader=val, out_dir=folder, resume=resume, progress=progress)
    metrics = evaluate(model, test, config.train.channels_last)
    model.leanconv_meta = {**model.leanconv_meta, "test": {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}}
    checkpoint.save(model, folder / "model.safetensors")
    record = {"variant": variant.name, "kind": variant.kind,
              "conversion": variant.spec.to_dict() if variant.spec else None,
              "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"],
              "val_accuracy": _last_metrics(folder).get("val_accuracy"), "epochs": config.train.epochs,
              "train_seconds": round(result.seconds, 2), "resumed": resume,
              "checkpoint": f"variants/{variant.name}/model.safetensors"}
    record.update(_measure(config, model, _input_shape(data)))
    return record


def run_explore(config: ExploreConfig, out_dir: str | Path, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train and measure every variant of ``config`` not yet in ``out_dir/results.jsonl``;
    returns the records of the variants of ``config`` in order (new and earlier ones).

    ``progress(done, total, info)`` reports the training steps of the variant being trained;
    ``info`` holds ``variant``, ``index`` (1-based) and ``variants`` besides the loop's values.
    Every variant still to do is built (and so checked, e.g. groups that do not divide a
    layer's channels) before anything is trained.
    """
    out = Path(out_dir)
    data = load_dataset(config.dataset, config.data_dir)
    todo = variants(config)
    budget = _budget(config, data)
    results_path = out / "results.jsonl"
    earlier = {r["variant"]: r for r in load_results(results_path)}
    for record in earlier.values():
        if record.get("budget") != budget:
            raise LeanconvError(f"{out} holds results of another model, dataset or training budget "
                                f"(variant {record['variant']}); use a new --out")
    for variant in todo:
        if variant.name not in earlier:
            build_variant(config, variant, data)
    out.mkdir(parents=True, exist_ok=True)
    loaders = _loaders(config, data) if any(v.name not in earlier for v in todo) else None
    for index, variant in enumerate(todo, 1):
        if variant.name in earlier:
            log.info("variant %s is done; skipped", variant.name)
            continue
        tagged = None if progress is None else (
            lambda d, t, info, _v=variant.name, _i=index: progress(d, t, {"variant": _v, "index": _i,
                                                                          "variants": len(todo), **info}))
        record = _run_variant(config, variant, data, out, loaders, tagged)
        record["budget"] = budget
        JsonlStore(results_path).append([record])
        earlier[variant.name] = record
        log.info("variant %s: %.2f%% test accuracy, %d MACs", variant.name, record["test_accuracy"], record["macs"])
    return [earlier[v.name] for v in todo]


def time_variants(config: ExploreConfig, out_dir: str | Path, records: Sequence[dict[str, Any]], *,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Every variant of ``records`` timed side by side with the dense model, per runtime and
    latency batch: ``{runtime: {"batch<B>": {"setting", "speedup": {variant: {median, low,
    high}}}}}`` (speedup = the dense model's time over the variant's, per round). The dense
    model is the trained ``dense`` variant when there is one, else the unconverted zoo model
    (speed does not depend on the weights)."""
    out = Path(out_dir)
    data = load_dataset(config.dataset, config.data_dir)
    shape = _input_shape(data)
    constructor = config.model if ":" in config.model else None
    models = {r["variant"]: checkpoint.load(out / r["checkpoint"], constructor=constructor) for r in records}
    if "dense" not in models:
        models = {"dense": build_variant(config, Variant("dense", "dense"), data), **models}
    models = {"dense": models.pop("dense"), **models}
    speed: dict[str, Any] = {}
    steps = [(runtime, batch) for runtime in config.runtimes for batch in config.latency_batches]
    for i, (runtime, batch) in enumerate(steps):
        side = time_side_by_side(models, shape, runtime=runtime, threads=config.train.threads or 1, batch=batch,
                                 rounds=config.timing_rounds, repeats=config.latency_repeats, warmup=2)
        speed.setdefault(runtime, {})[f"batch{batch}"] = {"setting": side.setting(), "speedup": side.speedup,
                                                          "latency_ms": side.latency_ms}
        if progress is not None:
            progress(i + 1, len(steps), {"runtime": runtime, "batch": batch})
    return speed


def pareto_front(records: Sequence[dict[str, Any]], x: str = "macs", y: str = "test_accuracy") -> list[str]:
    """Names of the variants no other variant beats on both ``x`` (lower is better) and ``y``
    (higher is better), in increasing ``x``."""
    front, best = [], float("-inf")
    for r in sorted(records, key=lambda r: (r[x], -r[y])):
        if r[y] > best:
            front.append(r["variant"])
            best = r[y]
    return front


def markdown_table(records: Sequence[dict[str, Any]], speed: dict[str, Any] | None = None) -> str:
    """One row per variant in increasing MACs; ``*`` marks the Pareto front (accuracy vs MACs).
    With ``speed`` (:func:`time_variants`), the speedup over the dense model per runtime and
    batch (median over rounds, slowest-fastest round), else each variant's own latency."""
    front = set(pareto_front(records))
    dense = next((r for r in records if r["kind"] == "dense"), None)
    if speed:
        columns = [(rt, b) for rt in speed for b in speed[rt]]
        heads = [f"speedup {rt} b{b[len('batch'):]}" for rt, b in columns]
    else:
        batches = sorted({k for r in records for k in r["latency_ms"]}, key=lambda k: int(k[len("batch"):]))
        heads = [f"latency b{k[len('batch'):]} (ms)" for k in batches]
    header = ["variant", "test acc (%)", "params", "MACs (M)", "MACs / dense", *heads, "Pareto"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: (r["macs"], r["variant"])):
        ratio = f"{r['macs'] / dense['macs']:.3f}" if dense else "n/a"
        if speed:
            timed = [speed[rt][b]["speedup"].get(r["variant"]) for rt, b in columns]
            measured = [f"{t['median']:.2f}x ({t['low']:.2f}-{t['high']:.2f})" if t else "n/a" for t in timed]
        else:
            measured = [f"{r['latency_ms'][k]:.2f}" if k in r["latency_ms"] else "n/a" for k in batches]
        cells = [r["variant"], f"{r['test_accuracy']:.2f}", f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}", ratio,
                 *measured, "*" if r["variant"] in front else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, config: ExploreConfig, speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``explore.json`` and ``table.md`` from every record in ``results.jsonl`` (and the
    side-by-side ``speed`` of :func:`time_variants`); returns the summary written (``config``,
    ``records``, ``pareto``, ``speed``)."""
    out = Path(out_dir)
    records = load_results(out / "results.jsonl")
    if not records:
        raise LeanconvError(f"{out} has no finished variants to summarise")
    summary = {"config": config.to_dict(), "records": records, "pareto": pareto_front(records),
               **({"speed": speed} if speed else {})}
    write_json(out / "explore.json", summary)
    write_text(out / "table.md", markdown_table(records, speed))
    return summary
