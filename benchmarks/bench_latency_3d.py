"""3-D pruning against width-only pruning at the same measured latency (not a test).

For each latency target R, the trained checkpoint is pruned twice to R of its measured latency
on the runtime: by ``leanconv prune --target-latency`` (width only) and by ``leanconv prune3d
--target-latency`` (depth x width x resolution), both with the same criterion and the same
fine-tuning. Each result's record gives its accuracy right after the cut (BatchNorm
re-estimated, test split), after the fine-tuning, and its counted MACs. Then the unpruned
model and both results are timed **side by side in one run** (interleaved rounds, each at its
own input side), so the two latency ratios come from the same measurement; the table prints
the median ratio and the slowest and fastest round. Rows append to ``OUT/results.jsonl`` (one
per target and seed; a re-run skips what is there); ``OUT/summary.md`` is the table.

    .venv/bin/python benchmarks/bench_latency_3d.py benchmarks/results/r20_fm10/model.safetensors \\
        --targets 0.33 --out benchmarks/results/bench_latency_3d
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from leanconv.cost.side_by_side import time_side_by_side
from leanconv.runs.prune import PruneConfig
from leanconv.runs.prune3d import Prune3dConfig
from leanconv.runs.source import Source


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--targets", type=float, nargs="+", default=[0.33])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--method", default="l1")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=10000, help="training images per fine-tuning epoch")
    p.add_argument("--samples", type=int, default=16, help="3-D samples")
    p.add_argument("--rounds", type=int, default=9, help="side-by-side rounds of the final timing")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _runs(args, target: float, seed: int) -> dict:
    common = {"method": args.method, "target": target, "kind": "latency", "runtime": args.runtime,
              "latency_batch": args.batch, "finetune_epochs": args.finetune_epochs,
              "train_subset": args.train_subset, "seed": seed}
    width = PruneConfig(**common, threads=1)
    cube = Prune3dConfig(**common, runtime_threads=1, samples=args.samples)
    source = Source.from_checkpoint(args.ckpt)
    out = {}
    for name, config in (("width", width), ("3d", cube)):
        t0 = time.perf_counter()
        folder = args.out / f"{name}_R{target:g}_s{seed}"
        result = config.run(source, out=folder)
        result.save(folder)
        record = result.record.to_dict()
        out[name] = {"model": result.model, "shape": tuple(result.model.leanconv_meta["input_shape"]),
                     "one_shot": record["after_prune_before_finetune"]["test_accuracy"],
                     "finetuned": record["after"]["test_accuracy"], "macs": record["achieved"]["macs"],
                     "own_measure": record["latency_budget"]["attempts"][-1]["measured"]["median"],
                     "seconds": time.perf_counter() - t0,
                     "choice": record.get("choice", {}).get("realised")}
    out["unpruned"] = {"model": source.fresh(), "shape": tuple(source.shape)}
    return out


def _row(args, target: float, seed: int) -> dict:
    runs = _runs(args, target, seed)
    models = {n: runs[n]["model"] for n in ("unpruned", "width", "3d")}
    sbs = time_side_by_side(models, {n: runs[n]["shape"] for n in models}, runtime=args.runtime, threads=1,
                            batch=args.batch, rounds=args.rounds, repeats=20, warmup=5, warmup_s=0.5)
    row = {"target": target, "seed": seed, "runtime": args.runtime, "batch": args.batch, "method": args.method,
           "finetune_epochs": args.finetune_epochs, "train_subset": args.train_subset,
           "unpruned_ms": sbs.latency_ms["unpruned"]["median_ms"]}
    for name in ("width", "3d"):
        r = runs[name]
        row[name] = {k: r[k] for k in ("one_shot", "finetuned", "macs", "own_measure", "seconds", "choice")}
        row[name]["ratio"] = sbs.ratio[name]
    return row


def _summary(rows: list[dict]) -> str:
    lines = ["| R | seed | method | measured ratio (spread) | MACs | one-shot acc | acc after fine-tuning | "
             "seconds | choice |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name in ("width", "3d"):
            r = row[name]
            ratio = r["ratio"]
            choice = "" if not r["choice"] else (f"d={r['choice']['d']:.2f} w={r['choice']['w']:.2f} "
                                                 f"side {r['choice']['side']}")
            lines.append(f"| {row['target']:g} | {row['seed']} | {name} | {ratio['median']:.3f} "
                         f"({ratio['low']:.3f}-{ratio['high']:.3f}) | {r['macs']:.3f} | {r['one_shot']:.2f} | "
                         f"{r['finetuned']:.2f} | {r['seconds']:.0f} | {choice} |")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["target"], r["seed"]) for r in rows}
    for target in args.targets:
        for seed in args.seeds:
            if (target, seed) in done:
                continue
            row = _row(args, target, seed)
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
    text = _summary(rows)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
