"""Criteria judged where they differ: right after the cut, and after 1 and 3 fine-tuning epochs.

For each criterion variant and seed the trained checkpoint is scored once (on the first
``--score-images`` validation images, as ``leanconv prune`` does), then for each MAC budget:

1. cut to the budget (mean-normalised global ranking unless the variant says ``/none``),
   BatchNorm statistics re-estimated on training images, test accuracy: **one-shot**;
2. from that cut, fine-tuned 1 epoch and, from the same cut again, 3 epochs (the shared
   loop, cosine from ``--finetune-lr``, ``--train-subset`` images an epoch), test accuracy.

Variants: ``l1, l2, taylor, bn, synflow, random`` and HAP with each curvature estimator
(``hap`` = the paper's Hutchinson probes and trace form, ``hap-hpp`` = Hutch++, ``hap-gn`` =
exact Gauss-Newton blocks with the trace form, ``hap-gnb`` = Gauss-Newton with the block form).
Recovery suffixes (from issue #15's item 4): ``+reg`` trains ``--reg-epochs`` epochs with the
group lasso (``--reg-strength``) before scoring (``leanconv prune --regularize-epochs``),
``+rec`` refits the layers that lost input channels right after the cut, on ``--rec-images``
training images (``leanconv prune --reconstruct-images``, the default there; without it the
variant keeps the weights as cut),
``+kd`` fine-tunes with distillation from the unpruned model (``leanconv prune --distill``,
default temperature and weight): ``l1+kd``, ``l1+reg+kd``, ``l1+rec+kd``, ``hap-gnb+kd``.
Seeds: variants that draw random numbers (``random``, ``hap``, ``hap-hpp``) run every seed;
the deterministic ones run the first seed only (their one-shot accuracy cannot change with
it; their fine-tuning noise is not measured). Differences are to ``--reference`` with the
standard error of the difference of the means (a one-run side counts as exact).

One JSON line per (variant, seed, budget) goes to ``OUT/results.jsonl``; a finished line is
never redone, so an interrupted run resumes. ``OUT/table.md`` is rewritten from all lines.

    .venv/bin/python benchmarks/bench_criteria.py benchmarks/results/r20_fm10/model.safetensors \\
        --out benchmarks/results/bench_criteria_r20
    .venv/bin/python benchmarks/bench_criteria.py CKPT --epochs '' --out OUT   # one-shot only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from leanconv.graph.groups import channel_groups
from leanconv.importance import ScoringData, run_criterion
from leanconv.runs import Source
from leanconv.train import evaluate, finetune
from leanconv.train.distill import Distillation
from leanconv.train.finetune import recalibrate_on_training_data
from leanconv.train.regularize import DEFAULT_STRENGTH, regularize
from leanconv.width.budget import prune_to_budget
from leanconv.width.reconstruct import reconstruct_on_training_data

# label -> (criterion, estimator, form, normalisation)
VARIANTS = {
    "l1": ("l1", "hutchinson", "trace", "mean"), "l2": ("l2", "hutchinson", "trace", "mean"),
    "taylor": ("taylor", "hutchinson", "trace", "mean"), "bn": ("bn", "hutchinson", "trace", "mean"),
    "synflow": ("synflow", "hutchinson", "trace", "mean"), "random": ("random", "hutchinson", "trace", "mean"),
    "hap": ("hap", "hutchinson", "trace", "mean"), "hap-hpp": ("hap", "hutch++", "trace", "mean"),
    "hap-gn": ("hap", "gauss-newton", "trace", "mean"), "hap-gnb": ("hap", "gauss-newton", "block", "mean"),
    "hap-gn/none": ("hap", "gauss-newton", "trace", "none"), "hap-gnb/none": ("hap", "gauss-newton", "block", "none"),
    "hap/none": ("hap", "hutchinson", "trace", "none"),
}
RANDOM = {"random", "hap", "hap-hpp", "hap/none"}


def done_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["label"], r["seed"], r["target"]) for r in map(json.loads, path.read_text().splitlines())}


def base_label(label: str) -> str:
    return label.split("+")[0]


def run_variant(source: Source, label: str, seed: int, targets: list[float], args, write) -> None:
    method, estimator, form, normalize = VARIANTS[base_label(label)]
    recovery = set(label.split("+")[1:])
    data, shape, res = source.data, source.shape, source.resolution
    test = data.loader("test", 256, resolution=res)
    scoring = ScoringData(data.scoring_batches(args.score_images, 128, res), extra={"input_shape": shape})
    criterion = run_criterion(method, probes=args.probes, seed=seed, estimator=estimator, form=form)
    model = source.fresh()
    example = torch.randn(1, *shape)
    torch.manual_seed(seed)
    reg_s = 0.0
    if "reg" in recovery:
        t0 = time.perf_counter()
        regularize(model, data, channel_groups(model, example), epochs=args.reg_epochs, strength=args.reg_strength,
                   lr=args.finetune_lr, seed=seed, images=args.train_subset)
        reg_s = time.perf_counter() - t0
    start = copy.deepcopy(model)
    t0 = time.perf_counter()
    scores = criterion(model, channel_groups(model, example), scoring)
    score_s = time.perf_counter() - t0
    teacher = Distillation(source.fresh()) if "kd" in recovery else None
    for target in targets:
        cut = copy.deepcopy(start)
        done = prune_to_budget(cut, [s.clone() for s in scores], example, target=target, kind="macs",
                               input_shape=shape, normalize=normalize)
        rec_s = 0.0
        if "rec" in recovery:
            t0 = time.perf_counter()
            reconstruct_on_training_data(start, cut, done.removed, data, example, images=args.rec_images,
                                         batch_size=128, resolution=res, seed=seed)
            rec_s = time.perf_counter() - t0
        recalibrate_on_training_data(cut, data, res, 128)
        row = {"label": label, "seed": seed, "target": target, "score_seconds": round(score_s, 1),
               "regularize_seconds": round(reg_s, 1), "reconstruct_seconds": round(rec_s, 1),
               "one_shot": evaluate(cut, test)["accuracy"]}
        for epochs in args.epochs:
            tuned = copy.deepcopy(cut)
            finetune(tuned, data, epochs=epochs, lr=args.finetune_lr, seed=seed, images=args.train_subset, loss=teacher)
            row[f"ft{epochs}"] = evaluate(tuned, test)["accuracy"]
        write(row)


def mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def table(rows: list[dict], baseline: float, reference: str, columns: list[str]) -> str:
    lines = [f"Unpruned test accuracy: {baseline:.2f}%. Mean over seeds (n); difference to {reference} "
             "± standard error of the difference of means.", ""]
    head = " | ".join(f"{c} | {c} vs {reference}" for c in columns)
    lines += [f"| target | variant | n | {head} | scoring s |", "|" + "---|" * (4 + 2 * len(columns))]
    for target in sorted({r["target"] for r in rows}, reverse=True):
        ref = [r for r in rows if r["label"] == reference and r["target"] == target]
        for label in list(dict.fromkeys(r["label"] for r in rows)):
            mine = [r for r in rows if r["label"] == label and r["target"] == target]
            if not mine:
                continue
            cells = []
            for c in columns:
                if not any(c in r for r in mine):
                    cells.append("- | -")
                    continue
                m, se = mean_se([r[c] for r in mine if c in r])
                if any(c in r for r in ref) and label != reference:
                    rm, rse = mean_se([r[c] for r in ref if c in r])
                    diff = f"{m - rm:+.2f} ± {math.hypot(se, rse):.2f}"
                else:
                    diff = "-"
                cells.append(f"{m:.2f}" + (f" ± {se:.2f}" if len(mine) > 1 else "") + f" | {diff}")
            secs = statistics.mean(r["score_seconds"] for r in mine)
            lines.append(f"| {target:g} | {label} | {len(mine)} | {' | '.join(cells)} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if "/" not in v))
    parser.add_argument("--budgets", default="0.5,0.33", help="MAC targets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", default="1,3", help="fine-tuning lengths, each from the one-shot cut ('' = none)")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--train-subset", type=int, default=None, help="training images per fine-tuning epoch")
    parser.add_argument("--score-images", type=int, default=512)
    parser.add_argument("--probes", type=int, default=32, help="probe cap (HVPs for hutch++) of the probing variants")
    parser.add_argument("--reference", default="hap")
    parser.add_argument("--rec-images", type=int, default=512,
                        help="training images the +rec variants refit on (leanconv prune --reconstruct-images)")
    parser.add_argument("--reg-epochs", type=int, default=1, help="group-lasso epochs of the +reg variants")
    parser.add_argument("--reg-strength", type=float, default=DEFAULT_STRENGTH)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.epochs = [int(e) for e in args.epochs.split(",") if e]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    source = Source.from_checkpoint(args.ckpt)
    targets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    def write(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")

    for label in [v for v in args.variants.split(",") if v]:
        if base_label(label) not in VARIANTS or not set(label.split("+")[1:]) <= {"reg", "rec", "kd"}:
            raise SystemExit(f"unknown variant {label!r}; choose from {', '.join(VARIANTS)}, with +reg, +rec "
                             "and/or +kd")
        for seed in seeds if base_label(label) in RANDOM else seeds[:1]:
            todo = [t for t in targets if (label, seed, t) not in done_keys(results)]
            if todo:
                run_variant(source, label, seed, todo, args, write)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    baseline = evaluate(source.fresh(), source.data.loader("test", 256, resolution=source.resolution))["accuracy"]
    columns = ["one_shot"] + [f"ft{e}" for e in args.epochs]
    (out / "table.md").write_text(table(rows, baseline, args.reference, columns))
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
