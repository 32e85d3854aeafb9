"""Whole models with the new convs: ResNet-20 dense vs DW+SCC vs pSConv at the same training budget.

Variants (issue "new efficient convolutions"): dense, DW + sliding-channel convs with groups 2
and 4 at overlap 0.5 (DSXplore), periodic sparse convs psd4_p8 and psd1_p16 (pSConv). Each is
trained from scratch by :func:`leanconv.convs.explore.run_explore` for the same epochs, seed and
schedule (resumable: finished variants in OUT/results.jsonl are reused), then every trained
model is timed again in interleaved rounds (every model once per round, batch 64 then 1, in
NCHW and channels_last; the faster layout is reported), so load from other processes hits all
of them alike. Speedups are medians of per-round ratios against the dense model.

    .venv/bin/python benchmarks/bench_new_conv_models.py --epochs 3 --out runs/bench_new_conv_models
    .venv/bin/python benchmarks/bench_new_conv_models.py --data synthetic --epochs 1 --subset 64 \
        --rounds 1 --repeats 2 --out /tmp/smoke          # a smoke run

Writes OUT/bench.json (config, records, latency per round), OUT/bench_table.md and
OUT/accuracy_vs_macs.png, besides the exploration's own files.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.cost import measure_latency
from leanconv.convs.explore import ExploreConfig, run_explore, write_summary
from leanconv.report.plots import tradeoff_chart
from leanconv.train import TrainConfig

BATCHES = (64, 1)
LAYOUTS = {"channels_last": True, "nchw": False}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3, help="training epochs per variant (default: 3)")
    p.add_argument("--subset", type=int, default=None, help="train on this many images only")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for training and timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (default: 5)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model, batch and round (default: 10)")
    p.add_argument("--out", default="runs/bench_new_conv_models")
    return p.parse_args()


def explore_config(a: argparse.Namespace) -> ExploreConfig:
    train = TrainConfig(epochs=a.epochs, lr=a.lr, seed=a.seed, threads=a.threads)
    return ExploreConfig(model="resnet20", dataset=a.data, data_dir=a.data_dir, scc_groups=(2, 4), scc_overlaps=(0.5,),
                         psconv_patterns=("psd4_p8", "psd1_p16"), include_dense=True, train=train,
                         batch_size=a.batch_size, subset=a.subset, latency_repeats=max(1, a.repeats // 2))


def interleaved_latency(models: dict[str, torch.nn.Module], shape, a: argparse.Namespace) -> dict:
    """``rounds[batch][layout][name]``: one median (ms) per round."""
    rounds = {b: {lay: {n: [] for n in models} for lay in LAYOUTS} for b in BATCHES}
    for _ in range(a.rounds):
        for batch in BATCHES:
            for name, model in models.items():
                for layout, nhwc in LAYOUTS.items():
                    stats = measure_latency(model, shape, batch, warmup=2, repeats=a.repeats, threads=a.threads,
                                            channels_last=nhwc)
                    rounds[batch][layout][name].append(stats.median_ms)
    return rounds


def summarise(records: list[dict], rounds: dict) -> list[dict]:
    """Per model: the faster layout per batch, its median over rounds, and the median per-round
    speedup against the dense model in its own faster layout."""
    rows = []
    for r in records:
        row = {"variant": r["variant"], "test_accuracy": r["test_accuracy"], "params": r["params"], "macs": r["macs"]}
        for batch in BATCHES:
            per = rounds[batch]
            best = {n: min(LAYOUTS, key=lambda lay: statistics.median(per[lay][n])) for n in ("dense", r["variant"])}
            mine, dense = per[best[r["variant"]]][r["variant"]], per[best["dense"]]["dense"]
            row[f"b{batch}_ms"] = statistics.median(mine)
            row[f"b{batch}_layout"] = best[r["variant"]]
            row[f"b{batch}_speedup"] = statistics.median(d / m for d, m in zip(dense, mine))
        rows.append(row)
    return rows


def table(rows: list[dict], dense_macs: int) -> str:
    header = "| variant | test acc (%) | params | MACs (M) | MAC reduction | b64 (ms) | speedup b64 | b1 (ms) | speedup b1 |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['test_accuracy']:.2f} | {r['params']:,} | {r['macs'] / 1e6:.2f} | "
                     f"{dense_macs / r['macs']:.2f}x | {r['b64_ms']:.2f} | {r['b64_speedup']:.2f}x | "
                     f"{r['b1_ms']:.3f} | {r['b1_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    config = explore_config(a)
    records = run_explore(config, out)
    write_summary(out, config)
    models = {r["variant"]: checkpoint.load(out / r["checkpoint"]) for r in records}
    shape = tuple(next(iter(models.values())).leanconv_meta["input_shape"])
    rounds = interleaved_latency(models, shape, a)
    rows = summarise(records, rounds)
    text = table(rows, next(r["macs"] for r in records if r["variant"] == "dense"))
    print(f"resnet20 on {config.dataset}, {a.epochs} epochs each, input {shape}, {torch.get_num_threads()} threads, "
          f"{a.rounds} interleaved rounds x {a.repeats} runs")
    print(text, end="")
    (out / "bench_table.md").write_text(text)
    tradeoff_chart([{"label": r["variant"], "macs": r["macs"] / 1e6, "accuracy": r["test_accuracy"]} for r in rows],
                   out / "accuracy_vs_macs.png", x="macs", xlabel="MACs per image (M, counted)",
                   title=f"ResNet-20 on {config.dataset}: new convs at {a.epochs} epochs")
    record = {"config": config.to_dict(), "args": vars(a), "machine": platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "input_shape": list(shape),
              "rows": rows, "latency_rounds_ms": {str(b): v for b, v in rounds.items()}, "records": records}
    (out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
