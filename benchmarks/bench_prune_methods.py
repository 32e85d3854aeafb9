"""Every pruning criterion at the same budgets and the same fine-tuning, on one trained model.

For each (method, budget, seed) the trained checkpoint is pruned to the budget (counted
MACs), fine-tuned for the same number of epochs with the same schedule, BN-recalibrated and
evaluated on the test split. One JSON line per run goes to ``OUT/results.jsonl`` (a
finished run is never redone, so an interrupted benchmark resumes), then ``OUT/table.md``
and ``OUT/accuracy_vs_macs.png`` are written from all lines (``--methods ''`` only rewrites
them, e.g. after merging the lines of several runs).

    .venv/bin/python benchmarks/bench_prune_methods.py runs/r20_fm10/model.safetensors \
        --budgets 0.5,0.33 --seeds 0,1 --finetune-epochs 3 --out runs/bench_prune
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from leanconv.runs.compare import WIDTH
from leanconv.runs import PruneConfig, Source, run_prune
from leanconv.runs.prune import round_to_arg
from leanconv.report.plots import tradeoff_chart

PROBES = 32
VARIANTS = WIDTH  # label -> (criterion, implant share), the same variants `leanconv compare` runs


def done_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["label"], r["target"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def one_run(ckpt: str, label: str, target: float, seed: int, args) -> dict:
    source = Source.from_checkpoint(ckpt)
    method, implant = VARIANTS[label]
    config = PruneConfig(method=method, target=target, implant=implant, implant_init=args.implant_init,
                         finetune_epochs=args.finetune_epochs,
                         finetune_lr=args.finetune_lr, seed=seed, probes=args.probes, latency_repeats=args.repeats,
                         normalize=args.normalize, latency_aware=args.latency_aware,
                         round_to=resolve_round_to(args.round_to), shrink=args.shrink)
    torch.manual_seed(seed)
    record = run_prune(config, source).record.to_dict()
    return {"label": labelled(label, args), "target": target, "seed": seed, "accuracy": record["after"]["test_accuracy"],
            "accuracy_before_finetune": (record["after_prune_before_finetune"] or {}).get("test_accuracy"),
            "baseline_accuracy": record["before"]["test_accuracy"], "macs": record["after"]["macs"],
            "params": record["after"]["params"], "macs_ratio": record["achieved"]["macs"],
            "speedup_batch64": record["speedup_batch64"], "mac_reduction": record["mac_reduction"],
            "hessian": record["hessian"], "seconds": record["seconds"]}


def resolve_round_to(text: str | None) -> int | None:
    """``--round-to`` as leanconv prune reads it: N, or ``auto`` for this CPU's vector width."""
    return None if text is None else round_to_arg(text)


def labelled(label: str, args) -> str:
    """A run with non-default options is its own row: ``hap/none``, ``l1+lat``, ``l2@16``,
    ``hap+implant:fit`` (``--implant-init fit``, variants with implants only), ``hap~shrunk`` (``--shrink``),
    ``hap#128`` (``--probes 128``; hap variants, any count but the default 32)."""
    label = label if args.normalize == "mean" else f"{label}/{args.normalize}"
    label = f"{label}:{args.implant_init}" if args.implant_init != "zero" and VARIANTS[label.split("/")[0]][1] else label
    label = label + "+lat" if args.latency_aware else label
    label = f"{label}~shrunk" if args.shrink and label.startswith("hap") else label
    label = f"{label}#{args.probes}" if args.probes != PROBES and label.startswith("hap") else label
    round_to = resolve_round_to(args.round_to)
    return f"{label}@{round_to}" if round_to else label


def versus(rows: list[dict], label: str, target: float, reference: str = "hap") -> str:
    """Mean paired difference in test accuracy to ``reference`` over the seeds both ran, with
    its standard error (seed-to-seed fine-tuning noise mostly cancels in the pairs)."""
    acc = lambda name: {r["seed"]: r["accuracy"] for r in rows if r["label"] == name and r["target"] == target}  # noqa: E731
    mine, ref = acc(label), acc(reference)
    seeds = sorted(set(mine) & set(ref))
    if label == reference or not seeds:
        return "-"
    diffs = [mine[s] - ref[s] for s in seeds]
    se = f" ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.2f}" if len(diffs) > 1 else ""
    return f"{statistics.mean(diffs):+.2f}{se} (n={len(diffs)})"


def table(rows: list[dict], baseline: float) -> str:
    lines = [f"Unpruned test accuracy: {baseline:.2f}%", "",
             "| method | target MACs | kept MACs | test acc (mean over seeds) | per seed | delta | vs hap, same seeds (± s.e.) "
             "| params | speedup b64 / MAC reduction |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["target"], r["label"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    for target, label in keys:
        mine = [r for r in rows if r["label"] == label and r["target"] == target]
        acc = statistics.mean(r["accuracy"] for r in mine)
        seeds = ", ".join(f"{r['accuracy']:.2f}" for r in sorted(mine, key=lambda r: r["seed"]))
        lines.append(f"| {label} | {target:g} | {statistics.mean(r['macs_ratio'] for r in mine):.3f} | {acc:.2f} | "
                     f"{seeds} | {acc - baseline:+.2f} | {versus(rows, label, target)} | "
                     f"{int(statistics.mean(r['params'] for r in mine)):,} | "
                     f"{statistics.mean(r['speedup_batch64'] for r in mine):.2f} / "
                     f"{statistics.mean(r['mac_reduction'] for r in mine):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--methods", default=",".join(VARIANTS))
    parser.add_argument("--budgets", default="0.5,0.33")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--probes", type=int, default=PROBES,
                        help=f"Hutchinson probe cap for hap (default {PROBES}; other counts are labelled hap#N)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--normalize", choices=("mean", "none"), default="mean",
                        help="score scaling of the global ranking (leanconv prune --normalize); "
                             "non-default runs are labelled METHOD/SCALING")
    parser.add_argument("--latency-aware", action="store_true", help="leanconv prune --latency-aware (label +lat)")
    parser.add_argument("--round-to", default=None,
                        help="N or auto: leanconv prune --round-to (label @N, N resolved on this CPU)")
    parser.add_argument("--shrink", action="store_true",
                        help="hap: leanconv prune --shrink (label ~shrunk on hap variants)")
    parser.add_argument("--implant-init", choices=("zero", "fit"), default="zero",
                        help="leanconv prune --implant-init (label :fit on variants with implants)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    finished = done_keys(results)
    for seed in map(int, args.seeds.split(",")):
        for target in map(float, args.budgets.split(",")):
            for label in filter(None, args.methods.split(",")):
                if (labelled(label, args), target, seed) in finished:
                    continue
                t0 = time.perf_counter()
                row = one_run(args.ckpt, label, target, seed, args)
                with open(results, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{label:12s} target {target:<5g} seed {seed}: acc {row['accuracy']:.2f}% "
                      f"(MACs x{row['macs_ratio']:.3f}, {time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    baseline = rows[0]["baseline_accuracy"]
    (out / "table.md").write_text(table(rows, baseline))
    points = [{"label": r["label"], "macs": r["macs"] / 1e6, "accuracy": r["accuracy"]} for r in rows]
    tradeoff_chart(points, out / "accuracy_vs_macs.png", x="macs", xlabel="MACs (millions, one image)",
                   baseline=baseline, title="pruning criteria, same fine-tuning budget")
    print(table(rows, baseline))


if __name__ == "__main__":
    main()
