r"""Pruning to a measured latency against pruning to MACs and Torch-Pruning, at the same speed.

For each checkpoint, runtime (``--runtimes``), batch (``--batches``), latency target R
(``--targets``, a fraction of the unpruned model's latency measured on that runtime) and seed,
every method prunes a fresh copy of the trained model:

- ``latency-l1`` / ``latency-hap``: ``prune_to_measured_latency`` (leanconv.runs.latency) with
  the l1 / hap (16 probes) criterion, prices = measured damage, best of 8 candidates;
- ``macs-l1`` / ``macs-l1-auto``: ``prune_to_budget`` with l1 to R of the MACs (``--macs-target``
  gives a fixed fraction instead), unaligned / ``round_to`` = this CPU's vector width. They are
  not placed at the latency target: their measured ratio is reported as it is;
- ``tp-l1-r16``: Torch-Pruning's uniform L1 pruner (MetaPruner, MagnitudeImportance(p=1),
  round_to=16, the final Linear kept). Its pruning ratio is placed at the target's *measured*
  latency: the distinct structures a grid of ratios gives are sorted by MACs (TP's rounding
  makes the structure non-monotonic in the ratio: a group whose rounded count would be 0 is
  left whole) and bisected by side-by-side timing (at most 6 timings) for the one closest to R
  at or below R + 0.03 (else the fastest timed).

Right after the cut, leanconv's models (not Torch-Pruning's) have the layers that lost input
channels refitted on ``--reconstruct-images`` training images, as ``leanconv prune`` does by
default (``leanconv.width.reconstruct``; 0 = as cut). Each model is then timed side by side
with the unpruned one on the runtime (1 thread), predicted
by the calibrated latency table (``LatencyBudget.check``), counted, judged one-shot (BatchNorm
re-estimated on training images, no fine-tuning) and fine-tuned (``--finetune-epochs`` on the
first ``--finetune-images`` training images, lr 0.01). One JSON line per (model, runtime, batch,
target, method, seed) goes to ``OUT/results.jsonl`` (a finished key is never redone, so an
interrupted run resumes); ``OUT/tables.jsonl`` holds the seconds of the first
``LatencyBudget.check`` per (model, runtime, batch), on a benchmark-private latency cache
(``OUT/cache``, empty at the first run). Timings are only meaningful on a quiet machine.
A target the runtime's staircase cannot reach by width alone (the library refuses it before any
pruning) is recorded as refused, with the floor it names. A MAC-budgeted model is the same on
every runtime and batch: one already fine-tuned in OUT (same one-shot accuracy, settings and
seed) lends its fine-tuned accuracy to the others instead of being fine-tuned again.

    .venv/bin/python benchmarks/bench_latency_budget.py --ckpt benchmarks/results/r20_fm10/model.safetensors \
        --label resnet20 --out benchmarks/results/bench_latency_budget
    .venv/bin/python benchmarks/bench_latency_budget.py --ckpt benchmarks/results/r56_fm3/model.safetensors \
        --label resnet56 --out benchmarks/results/bench_latency_budget
    .venv/bin/python benchmarks/bench_latency_budget.py --summary --out benchmarks/results/bench_latency_budget
    # a smoke test (1 epoch on 500 images, 128 scoring images, 3 timing rounds, 2,000 test images),
    # never into results/:
    .venv/bin/python benchmarks/bench_latency_budget.py --quick --runtimes onnxruntime --batches 64 \
        --targets 0.5 --methods latency-l1,macs-l1,tp-l1-r16 --out /tmp/bench_latency_budget_smoke
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from leanconv.cost import count, simd_channels
from leanconv.cost.latency_table import LatencyModel
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData, run_criterion
from leanconv.runs.latency import SLACK, LatencyBudget, prune_to_measured_latency
from leanconv.runs.source import Source
from leanconv.train import evaluate, finetune, recalibrate_on_training_data
from leanconv.width import latency_budget
from leanconv.width.budget import prune_to_budget
from leanconv.width.reconstruct import reconstruct_on_training_data

METHODS = ("latency-l1", "latency-hap", "macs-l1", "macs-l1-auto", "tp-l1-r16")
DEFAULT_METHODS = "latency-l1,macs-l1,macs-l1-auto,tp-l1-r16"  # latency-hap: HAP scoring is slow
DEFAULT_CKPT = "benchmarks/results/r20_fm10/model.safetensors"
CANDIDATES, HAP_PROBES, TP_ROUND_TO, TP_STEPS, TP_SEARCH_ROUNDS = 8, 16, 16, 6, 3
QUICK_TEST_IMAGES = 2000  # --quick judges the pruned models on this many test images (a fixed subset)
TP_GRID = [i / 40 for i in range(1, 40)]  # pruning ratios whose structures the peer's search sorts
KEY = ("model", "runtime", "batch", "target", "method", "seed")


@dataclass(frozen=True)
class Setting:
    """One (model, runtime, batch, target): what every method of it shares."""

    label: str
    source: Source
    base: nn.Module  # the unpruned model (timed beside every result; never changed)
    base_accuracy: float
    budget: LatencyBudget
    latency: LatencyModel  # calibrated on ``base`` (``LatencyBudget.check``)
    target: float
    args: argparse.Namespace

    @property
    def shape(self):
        return self.source.shape

    def example(self) -> torch.Tensor:
        return torch.randn(1, *self.shape)

    def measure(self, model: nn.Module, rounds: int) -> dict:
        sbs = time_side_by_side({"unpruned": self.base, "pruned": model}, self.shape, runtime=self.budget.runtime,
                                threads=1, batch=self.budget.batch, rounds=rounds, repeats=10)
        return {"ratio": sbs.ratio["pruned"], "latency_ms": sbs.latency_ms, "version": sbs.version, "cpu": sbs.cpu}


class Timed:
    """A criterion that adds the seconds of its calls to ``seconds`` (the engine sees the same protocol)."""

    def __init__(self, criterion) -> None:
        self.criterion, self.seconds = criterion, 0.0
        self.name = getattr(criterion, "name", type(criterion).__name__)

    def __call__(self, model, groups, data):
        t0 = time.perf_counter()
        try:
            return self.criterion(model, groups, data)
        finally:
            self.seconds += time.perf_counter() - t0


@dataclass(frozen=True)
class TimedBudget(LatencyBudget):
    """A LatencyBudget that keeps the seconds of each side-by-side measurement it makes."""

    spent: list = field(default_factory=list, compare=False)

    def measure(self, models, shape):
        t0 = time.perf_counter()
        try:
            return super().measure(models, shape)
        finally:
            self.spent.append(time.perf_counter() - t0)


def scoring(s: Setting, seed: int) -> ScoringData:
    """Seed 0: the first validation images (what ``leanconv prune`` scores on); other seeds: a
    seeded draw of as many validation images."""
    data, n = s.source.data, s.args.score_images
    if seed == 0:
        batches = data.scoring_batches(n, 128, s.source.resolution)
    else:
        loader = data.loader("val", 128, shuffle=True, seed=seed, resolution=s.source.resolution)
        batches, left = [], n
        for x, y in loader.epoch(0):
            batches.append((x[:left], y[:left]))
            left -= len(batches[-1][1])
            if left <= 0:
                break
    return ScoringData(batches, extra={"input_shape": s.shape})


def prune_latency(model: nn.Module, s: Setting, seed: int, method: str) -> dict:
    """``latency-l1`` / ``latency-hap``: the library's measured-latency loop, with its seconds split."""
    criterion = Timed(run_criterion(method, probes=HAP_PROBES, seed=seed))
    budget = TimedBudget(s.budget.runtime, 1, s.budget.batch)
    marks = {}

    def progress(done, total, info):
        marks.setdefault(info.get("stage"), time.perf_counter())

    judged = []  # seconds of each choice among candidates (realising and judging them)
    choose = latency_budget.choose

    def timed_choose(*args, **kwargs):
        t = time.perf_counter()
        try:
            return choose(*args, **kwargs)
        finally:
            judged.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    latency_budget.choose = timed_choose
    try:
        results, attempts = prune_to_measured_latency(model, criterion, s.example(), s.latency, budget, target=s.target,
                                                shape=s.shape, data=scoring(s, seed), candidates=CANDIDATES,
                                                seed=seed, progress=progress)
    finally:
        latency_budget.choose = choose
    end, measuring = time.perf_counter(), sum(budget.spent)
    scored = marks.get("scores", end)
    return {"attempts": attempts, "removed": results[-1].removed, "seconds": {
        "criterion": criterion.seconds, "damage": scored - marks.get("groups", t0) - criterion.seconds,
        "solve": end - scored - measuring - sum(judged), "candidates": sum(judged),
        "measure_attempts": measuring, "prune_total": end - t0}}


def macs_goal(s: Setting) -> float:
    """The MAC budget of the ``macs-*`` methods: ``--macs-target``, else the latency target R."""
    return s.target if s.args.macs_target is None else s.args.macs_target


def prune_macs(model: nn.Module, s: Setting, seed: int, round_to: int | None) -> dict:
    """``macs-l1`` / ``macs-l1-auto``: a MAC budget, global L1 ranking."""
    goal = macs_goal(s)
    criterion = Timed(run_criterion("l1", probes=HAP_PROBES, seed=seed))
    t0 = time.perf_counter()
    result = prune_to_budget(model, criterion, s.example(), target=goal, kind="macs", input_shape=s.shape,
                             round_to=round_to, data=scoring(s, seed))
    total = time.perf_counter() - t0
    return {"macs_target": goal, "round_to": round_to, "achieved_macs": result.achieved, "removed": result.removed,
            "seconds": {"criterion": criterion.seconds, "solve": total - criterion.seconds, "prune_total": total}}


def tp_prune(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's uniform L1 pruner at ``ratio`` (in place)."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  global_pruning=False, pruning_ratio=ratio, round_to=TP_ROUND_TO,
                                  ignored_layers=[head])
    pruner.step()
    return model


@functools.cache
def tp_structures(ckpt: str, shape: tuple[int, ...]) -> tuple[tuple[float, float], ...]:
    """(smallest ratio, MAC ratio) of each distinct pruned structure TP_GRID gives on the trained
    model, most MACs first (the same for every runtime, batch and target: found once)."""
    model = Source.from_checkpoint(ckpt).fresh()
    macs0, found = count(model, shape).macs, {}
    for ratio in TP_GRID:
        trial = tp_prune(copy.deepcopy(model), ratio, torch.randn(1, *shape))
        widths = tuple(m.weight.shape for m in trial.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        found.setdefault(widths, (ratio, count(trial, shape).macs / macs0))
    return tuple(sorted((v for v in found.values() if v[1] < 1), key=lambda v: -v[1]))


def prune_tp(model: nn.Module, s: Setting, seed: int) -> dict:
    """``tp-l1-r16``: the peer, its ratio bisected to the target's measured latency (module docstring)."""
    t0 = time.perf_counter()
    options, trace = tp_structures(str(s.source.checkpoint), tuple(s.shape)), []
    lo, hi = -1, len(options)  # options[hi:] measured at or below R + SLACK, options[:lo + 1] above
    for _ in range(TP_STEPS):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        ratio, macs = options[mid]
        measured = s.measure(tp_prune(copy.deepcopy(model), ratio, s.example()), TP_SEARCH_ROUNDS)["ratio"]["median"]
        trace.append({"pruning_ratio": ratio, "macs_ratio": macs, "measured": measured})
        lo, hi = (lo, mid) if measured <= s.target + SLACK else (mid, hi)
    if not trace:
        raise LeanconvError(f"Torch-Pruning finds no structure to prune at ratios {TP_GRID[0]}-{TP_GRID[-1]}")
    within = [t for t in trace if t["measured"] <= s.target + SLACK]
    chosen = min(within, key=lambda t: abs(t["measured"] - s.target)) if within else min(
        trace, key=lambda t: t["measured"])
    tp_prune(model, chosen["pruning_ratio"], s.example())
    return {"pruning_ratio": chosen["pruning_ratio"], "structures": len(options), "search": trace,
            "seconds": {"solve": time.perf_counter() - t0, "prune_total": time.perf_counter() - t0}}


def prune(model: nn.Module, s: Setting, seed: int, method: str) -> dict:
    if method in ("latency-l1", "latency-hap"):
        return prune_latency(model, s, seed, method.split("-")[1])
    if method in ("macs-l1", "macs-l1-auto"):
        return prune_macs(model, s, seed, simd_channels() if method.endswith("auto") else None)
    if method == "tp-l1-r16":
        return prune_tp(model, s, seed)
    raise LeanconvError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def reusable(earlier: list[dict], s: Setting, seed: int, method: str, one_shot: float) -> dict | None:
    """An earlier row whose fine-tuned accuracy holds for this one: a MAC-budgeted model does not
    depend on the runtime or batch, so the same (model, method, MAC budget, seed, settings) prunes
    the same model; its one-shot accuracy must also be the same, else it is fine-tuned again."""
    if not method.startswith("macs-"):
        return None
    return next((r for r in earlier if "refused" not in r and r["model"] == s.label and r["method"] == method
                 and r["seed"] == seed and r["info"].get("macs_target") == macs_goal(s)
                 and r["settings"] == settings(s.args) and r.get("one_shot_accuracy") == one_shot
                 and "finetuned_accuracy" in r), None)


def run_one(s: Setting, seed: int, method: str, earlier: list[dict] = ()) -> dict:
    """Prune a fresh copy with ``method``, then time, predict, count, judge and fine-tune it
    (a MAC-budgeted model already fine-tuned in ``earlier`` rows is not fine-tuned again)."""
    args, data, resolution = s.args, s.source.data, s.source.resolution
    load = os.getloadavg()[0]
    torch.manual_seed(seed)
    model = s.source.fresh()
    info = prune(model, s, seed, method)
    removed = info.pop("removed", None)
    if args.reconstruct_images and removed is not None:  # the library's default after a cut; TP has no record of it
        t0 = time.perf_counter()
        reconstruct_on_training_data(s.source.fresh(), model, removed, data, s.example(),
                                     images=args.reconstruct_images, batch_size=128, resolution=resolution, seed=seed)
        info["seconds"]["reconstruct"] = time.perf_counter() - t0
    timed = s.measure(model, args.rounds)
    ratio = timed["ratio"]
    predicted = s.latency.predict(model) / s.latency.reference_ms
    before, after = count(s.base, s.shape), count(model, s.shape)
    test = data.loader("test", 256, resolution=resolution, subset=args.test_images)
    recalibrate_on_training_data(model, data, resolution)
    one_shot = evaluate(model, test)["accuracy"]
    same = reusable(earlier, s, seed, method, one_shot)
    if same is None:
        t0 = time.perf_counter()
        finetune(model, data, epochs=args.finetune_epochs, lr=0.01, seed=seed, resolution=resolution,
                 images=args.finetune_images)
        info["seconds"]["finetune"] = time.perf_counter() - t0
        finetuned = evaluate(model, test)["accuracy"]
    else:
        finetuned = same["finetuned_accuracy"]
        info["finetuned_as"] = {k: same[k] for k in KEY}
    return {"model": s.label, "runtime": s.budget.runtime, "batch": s.budget.batch, "target": s.target,
            "method": method, "seed": seed, "measured": ratio, "latency_ms": timed["latency_ms"],
            "predicted": predicted, "prediction_error": predicted / ratio["median"] - 1,
            "macs_ratio": after.macs / before.macs, "params_ratio": after.params / before.params,
            "macs": after.macs, "params": after.params, "target_met": ratio["median"] <= s.target + SLACK,
            "one_shot_accuracy": one_shot, "finetuned_accuracy": finetuned,
            "unpruned_accuracy": s.base_accuracy, "info": info, "load_average_at_start": load,
            "runtime_version": timed["version"], "cpu": timed["cpu"], "ckpt": str(s.source.checkpoint),
            "settings": settings(args)}


def settings(args) -> dict:
    names = ("finetune_epochs", "finetune_images", "score_images", "rounds", "macs_target", "test_images", "quick",
             "reconstruct_images")
    return {k: getattr(args, k) for k in names} | {"candidates": CANDIDATES, "threads": 1}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def check(label: str, budget: LatencyBudget, base: nn.Module, shape, target: float, out: Path):
    """The calibrated latency model (``LatencyBudget.check``); the first check of a (model, runtime,
    batch) goes to ``tables.jsonl`` with its seconds and the cache entries it started from."""
    start = len(budget.table().entries)
    t0 = time.perf_counter()
    latency = budget.check(base, torch.randn(1, *shape), shape, target)
    seconds = time.perf_counter() - t0
    known = {(r["model"], r["runtime"], r["batch"]) for r in read_jsonl(out / "tables.jsonl")}
    if (label, budget.runtime, budget.batch) not in known:
        append(out / "tables.jsonl", {"model": label, "runtime": budget.runtime, "batch": budget.batch,
                                      "threads": budget.threads, "check_seconds": seconds, "entries_before": start,
                                      "entries_after": len(latency.table.entries),
                                      "reference_ms": latency.reference_ms, "scale": latency.scale,
                                      "cpu": latency.table.key["cpu"], "version": latency.table.key["version"]})
    return latency


def run_checkpoint(ckpt: str, label: str, args, out: Path) -> None:
    results, done = out / "results.jsonl", {tuple(r[k] for k in KEY) for r in read_jsonl(out / "results.jsonl")}
    source, base, base_accuracy = Source.from_checkpoint(ckpt), None, None
    for runtime in args.runtimes:
        for batch in args.batches:
            budget = LatencyBudget(runtime, 1, batch)
            for target in args.targets:
                todo = [(seed, m) for seed in range(args.seeds) for m in args.methods
                        if (label, runtime, batch, target, m, seed) not in done]
                if not todo:
                    continue
                if base is None:
                    base = source.fresh().eval()
                    test = source.data.loader("test", 256, resolution=source.resolution, subset=args.test_images)
                    base_accuracy = evaluate(base, test)["accuracy"]
                try:
                    latency = check(label, budget, base, source.shape, target, out)
                except LeanconvError as exc:  # e.g. a target below the width-only floor: recorded, not run
                    print(f"{label} {runtime} b{batch} target {target:g}: refused: {exc}", flush=True)
                    for seed, method in todo:
                        append(results, {"model": label, "runtime": runtime, "batch": batch, "target": target,
                                         "method": method, "seed": seed, "refused": str(exc),
                                         "settings": settings(args)})
                    continue
                s = Setting(label, source, base, base_accuracy, budget, latency, target, args)
                for seed, method in todo:
                    t0 = time.perf_counter()
                    row = run_one(s, seed, method, read_jsonl(results))
                    append(results, row)
                    print(f"{label} {runtime} b{batch} R={target:g} {method:13s} seed {seed}: measured "
                          f"{row['measured']['median']:.3f}, predicted {row['predicted']:.3f}, MACs "
                          f"{row['macs_ratio']:.3f}, one-shot {row['one_shot_accuracy']:.2f}%, FT "
                          f"{row['finetuned_accuracy']:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)


def mean_se(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f}"


def method_line(rows: list[dict]) -> str:
    r0, n = rows[0], len(rows)
    med = statistics.mean(r["measured"]["median"] for r in rows)
    low, high = min(r["measured"]["low"] for r in rows), max(r["measured"]["high"] for r in rows)
    met = sum(r["target_met"] for r in rows)
    return (f"| {r0['model']} | {r0['runtime']} | {r0['batch']} | {r0['target']:g} | {r0['method']} | {med:.3f} "
            f"({low:.3f}-{high:.3f}) | {statistics.mean(r['predicted'] for r in rows):.3f} | "
            f"{100 * statistics.mean(r['prediction_error'] for r in rows):+.1f} | "
            f"{statistics.mean(r['macs_ratio'] for r in rows):.3f} | "
            f"{mean_se([r['one_shot_accuracy'] for r in rows])} | {mean_se([r['finetuned_accuracy'] for r in rows])} "
            f"| {'yes' if met == n else 'no' if met == 0 else f'{met}/{n}'} |")


def versus(rows: list[dict], method: str, reference: str) -> str:
    """Mean paired difference in fine-tuned accuracy, ``method`` minus ``reference``, over shared seeds."""
    def acc(name: str) -> dict[int, float]:
        return {r["seed"]: r["finetuned_accuracy"] for r in rows if r["method"] == name}

    mine, ref = acc(method), acc(reference)
    diffs = [mine[k] - ref[k] for k in sorted(set(mine) & set(ref))]
    if not diffs:
        return "-"
    se = f" ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.2f}" if len(diffs) > 1 else ""
    return f"{statistics.mean(diffs):+.2f}{se} (n={len(diffs)})"


def header(rows: list[dict]) -> list[str]:
    tuning = sorted({(r["settings"]["finetune_epochs"], r["settings"]["finetune_images"],
                      r["settings"].get("test_images") or "all") for r in rows}, key=str)
    done = "; ".join(f"{e} epoch(s) on the first {n:,} training images, lr 0.01, accuracy on {t} test images"
                     for e, n, t in tuning)
    base = ", ".join(sorted({f"{r['model']} {r['unpruned_accuracy']:.2f}%" for r in rows}))
    ratios = f"latency over the unpruned model's, measured side by side, 1 thread; met: median <= R + {SLACK}"
    return [f"Fine-tuned {done}; ratios: {ratios}.", f"Unpruned test accuracy: {base}", ""]


def method_table(rows: list[dict]) -> list[str]:
    order = {m: i for i, m in enumerate(METHODS)}
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (*(r[k] for k in KEY[:3]), -r["target"], order.get(r["method"], 9))):
        groups.setdefault(tuple(r[k] for k in KEY[:5]), []).append(r)
    head = ("| model | runtime | batch | R | method | measured (low-high) | predicted | pred. error % | MACs "
            "| one-shot acc | FT acc | met |")
    return [head, "|---|---|---|---|---|---|---|---|---|---|---|---|", *(method_line(g) for g in groups.values())]


def prediction_table(rows: list[dict], tables: list[dict]) -> list[str]:
    lines = ["| model | runtime | batch | max abs pred. error % | table build s (first check) |",
             "|---|---|---|---|---|"]
    for key in sorted({tuple(r[k] for k in KEY[:3]) for r in rows}):
        errors = [abs(r["prediction_error"]) for r in rows if tuple(r[k] for k in KEY[:3]) == key]
        built = [t for t in tables if (t["model"], t["runtime"], t["batch"]) == key]
        note = "-" if not built else (f"{built[0]['check_seconds']:.1f} (cache {built[0]['entries_before']} -> "
                                      f"{built[0]['entries_after']} entries)")
        lines.append(f"| {' | '.join(map(str, key))} | {100 * max(errors):.1f} | {note} |")
    return lines


def difference_table(rows: list[dict]) -> list[str]:
    lines = ["| model | runtime | batch | R | FT acc: latency-l1 - macs-l1 | latency-l1 - tp-l1-r16 |",
             "|---|---|---|---|---|---|"]
    for key in sorted({tuple(r[k] for k in KEY[:4]) for r in rows}, key=lambda k: (k[:3], -k[3])):
        mine = [r for r in rows if tuple(r[k] for k in KEY[:4]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {versus(mine, 'latency-l1', 'macs-l1')} | "
                     f"{versus(mine, 'latency-l1', 'tp-l1-r16')} |")
    return lines


def seconds_table(rows: list[dict]) -> list[str]:
    """Where a latency budget's time goes (rows from before the split have no candidates column)."""
    lines = ["| model | runtime | batch | R | method | criterion s | damage s | solve s | candidates s | timing s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["info"].get("seconds", {})
        if not r["method"].startswith("latency"):
            continue
        cells = [t.get(k) for k in ("criterion", "damage", "solve", "candidates", "measure_attempts")]
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['target']:g} | {r['method']} | "
                     + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    return lines


def summary(out: Path) -> str:
    """The Markdown tables of OUT's records: per method, per (model, runtime, batch), and the paired differences."""
    rows, tables = read_jsonl(out / "results.jsonl"), read_jsonl(out / "tables.jsonl")
    refused = sorted({tuple(r[k] for k in KEY[:4]) + (r["refused"],) for r in rows if "refused" in r},
                     key=lambda k: (k[:3], -k[3]))
    rows = [r for r in rows if "refused" not in r]
    if not rows and not refused:
        return f"no results in {out / 'results.jsonl'}\n"
    lines = [*header(rows), *method_table(rows), "", *prediction_table(rows, tables), "", *difference_table(rows),
             "", *seconds_table(rows)] if rows else []
    if refused:
        lines += ["", "| model | runtime | batch | R | refused before any pruning |", "|---|---|---|---|---|",
                  *(f"| {m} | {rt} | {b} | {t:g} | {why} |" for m, rt, b, t, why in refused)]
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", help=f"a trained checkpoint (repeatable; default {DEFAULT_CKPT})")
    p.add_argument("--label", action="append", help="its name in the records (one per --ckpt; default: its folder)")
    p.add_argument("--runtimes", default="onnxruntime,torch")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--targets", default="0.5,0.33", help="latency targets R, fractions of the measured latency")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    p.add_argument("--macs-target", type=float, default=None, help="MAC budget of macs-* (default: R)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-images", type=int, default=10000)
    p.add_argument("--score-images", type=int, default=512)
    p.add_argument("--reconstruct-images", type=int, default=512,
                   help="refit the layers that lost input channels on N training images right after the cut, as "
                   "leanconv prune does by default (0 = keep the weights as cut; Torch-Pruning's models never are)")
    p.add_argument("--rounds", type=int, default=7, help="side-by-side rounds of 10 calls for each result")
    p.add_argument("--out", default="benchmarks/results/bench_latency_budget")
    p.add_argument("--summary", action="store_true", help="only print the tables from OUT's records")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch on 500 images, 128 scoring images, "
                                                        f"3 rounds, {QUICK_TEST_IMAGES:,} test images")
    args = p.parse_args(argv)
    if args.quick:
        args.finetune_epochs, args.finetune_images, args.score_images, args.rounds = 1, 500, 128, 3
    args.test_images = QUICK_TEST_IMAGES if args.quick else None  # None: the whole test split
    args.ckpt = args.ckpt or [DEFAULT_CKPT]
    args.label = args.label or [Path(c).parent.name for c in args.ckpt]
    if len(args.label) != len(args.ckpt):
        p.error("give one --label per --ckpt")
    args.runtimes = args.runtimes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main() -> None:
    args = parse()
    out = Path(args.out)
    if not args.summary:
        load = os.getloadavg()[0]
        if load > 1.5:
            print(f"warning: the 1-minute load average is {load:.2f} (> 1.5): other work shares this machine, "
                  "and the latency figures are only meaningful on a quiet one", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        os.environ["XDG_CACHE_HOME"] = str((out / "cache").resolve())  # a private latency table cache
        torch.set_num_threads(2)  # pruning, fine-tuning, evaluation; every timing runs on 1 thread
        if any(r["settings"] != settings(args) for r in read_jsonl(out / "results.jsonl")):
            print(f"warning: {out / 'results.jsonl'} holds results made with other settings; their keys are not "
                  "redone (use another --out to compare settings)", flush=True)
        print(f"fine-tuning {args.finetune_epochs} epoch(s) on the first {args.finetune_images:,} training images; "
              f"scoring on {args.score_images} validation images; results in {out}", flush=True)
        for ckpt, label in zip(args.ckpt, args.label):
            run_checkpoint(ckpt, label, args, out)
    print(summary(out), end="")


if __name__ == "__main__":
    main()
