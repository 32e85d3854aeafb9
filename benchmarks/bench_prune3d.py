"""Three-dimensional pruning against one-dimensional pruning at the same MACs budget.

On one trained model (default: a ResNet-20 trained here on Fashion-MNIST), every variant is
pruned to at most ``--target`` of the counted MACs and its final model is fine-tuned for the
same ``--finetune-epochs`` epochs on the whole training split (same learning rate, cosine
schedule, BatchNorm re-estimated), then evaluated on the test split:

* ``3d``: ``leanconv prune3d`` (samples -> predictor -> optimum -> realise), whose sampling
  cost (brief fine-tuning of every sample) is reported separately as search time;
* ``width (hap)``: channels only, HAP scores, via the prune run (``run_prune``);
* ``depth``: residual blocks only (``"loss"`` importance), the most blocks within budget
  (stages may lose all their removable blocks, else depth alone rarely reaches the budget);
* ``resolution``: input side only, the largest side within budget.

One JSON line per variant goes to ``OUT/results.jsonl`` (a finished variant is not redone;
the 3-D samples resume from ``OUT/3d/samples.jsonl``), then ``OUT/results.json`` and
``OUT/table.md`` are written from all lines.

    .venv/bin/python benchmarks/bench_prune3d.py --data fashion-mnist --train-epochs 10 \\
        --target 0.33 --finetune-epochs 3 --samples 16 --workers 4 --out runs/bench_prune3d
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.cost import count
from leanconv.data import load_dataset
from leanconv.models import create
from leanconv.runs import Prune3dConfig, PruneConfig, Source, measure, run_prune, run_prune3d
from leanconv.prune3d.resolution import set_resolution
from leanconv.prune3d.executors import create_executor
from leanconv.prune3d.realise import StepSettings, brief_finetune, load_origin, realise, val_accuracy
from leanconv.train import TrainConfig, fit

VARIANTS = ("3d", "width (hap)", "depth", "resolution")


def train_base(args) -> Path:
    """The trained model to prune: ``--ckpt``, else a ResNet-20 trained here once (reused)."""
    if args.ckpt:
        return Path(args.ckpt)
    path = Path(args.out) / "base" / "model.safetensors"
    if path.exists():
        return path
    data = load_dataset(args.data)
    torch.manual_seed(args.seed)
    model = create("resnet20", in_channels=data.in_channels, input_size=data.image_size, num_classes=data.num_classes)
    model.leanconv_meta = {"input_shape": [data.in_channels, data.image_size, data.image_size],
                           "num_classes": data.num_classes, "dataset": {"name": data.name, "data_dir": None}}
    train = data.loader("train", 128, shuffle=True, augment=True, seed=args.seed, drop_last=True)
    fit(model, train, TrainConfig(epochs=args.train_epochs, lr=0.1, seed=args.seed))
    checkpoint.save(model, path)
    return path


def settings(args, data_name: str, min_per_stage: int = 1) -> StepSettings:
    return StepSettings(data=data_name, method="hap", score_images=args.score_images, probes=args.probes,
                        min_per_stage=min_per_stage, epochs=args.sample_epochs, images=args.sample_images,
                        lr=args.lr, seed=args.seed)


def finish(model, origin, point: dict, args, t0: float) -> dict:
    """The shared final step: fine-tune, validation accuracy, test accuracy, cost, latency."""
    brief_finetune(model, origin.data, origin.settings, epochs=args.finetune_epochs, images=None)
    shape = tuple(model.leanconv_meta["input_shape"])
    side = shape[-1]
    test = origin.data.loader("test", 256, resolution=None if side == origin.data.image_size else side)
    after = measure(model, shape, test, args.repeats)
    return {**point, "val_accuracy": val_accuracy(model, origin.data), "test_accuracy": after["test_accuracy"],
            "macs": after["macs"], "params": after["params"], "macs_ratio": after["macs"] / origin.macs,
            "latency_ms": after["latency_ms"], "seconds": time.perf_counter() - t0}


def run_3d(ckpt: Path, args, data_name: str) -> dict:
    t0 = time.perf_counter()
    config = Prune3dConfig(target=args.target, samples=args.samples, sample_epochs=args.sample_epochs,
                           sample_images=args.sample_images, finetune_epochs=args.finetune_epochs, finetune_lr=args.lr,
                           score_images=args.score_images, probes=args.probes, seed=args.seed,
                           latency_repeats=args.repeats)
    executor = create_executor(args.executor, workers=args.workers, threads=args.worker_threads)
    source = Source.from_checkpoint(ckpt, data=data_name)
    record = run_prune3d(config, source, out=Path(args.out) / "3d", executor=executor).record.to_dict()
    c, acc = record["choice"], record["accuracy"]
    return {"d": c["d"], "w": c["w"], "r": c["r"], "side": c["realised"]["side"], "feasible": True,
            "val_accuracy": acc["val_after_finetune"], "test_accuracy": acc["test_after"],
            "predicted_val_accuracy": acc["predicted_val"], "measured_val_accuracy_protocol": acc["measured_val_protocol"],
            "macs": record["after"]["macs"], "params": record["after"]["params"], "macs_ratio": record["achieved"]["macs"],
            "latency_ms": record["after"]["latency_ms"], "search_seconds": record["seconds"]["samples"],
            "samples": len(record["samples"]), "holdout": {k: v for k, v in (record["holdout"] or {}).items()
                                                          if not k.endswith("_model")},
            "seconds": time.perf_counter() - t0}


def run_width(ckpt: Path, args, data_name: str) -> dict:
    t0 = time.perf_counter()
    source = Source.from_checkpoint(ckpt, data=data_name)
    shape = source.shape
    config = PruneConfig(method="hap", target=args.target, finetune_epochs=args.finetune_epochs, finetune_lr=args.lr,
                         score_images=args.score_images, probes=args.probes, seed=args.seed,
                         latency_repeats=args.repeats)
    result = run_prune(config, source)
    model, record = result.model, result.record.to_dict()
    origin = load_origin(str(ckpt), settings(args, data_name))
    w = (record["after"]["macs"] / record["before"]["macs"]) ** 0.5
    return {"d": 1.0, "w": w, "r": 1.0, "side": shape[-1], "feasible": True,
            "val_accuracy": val_accuracy(model, origin.data), "test_accuracy": record["after"]["test_accuracy"],
            "macs": record["after"]["macs"], "params": record["after"]["params"],
            "macs_ratio": record["achieved"]["macs"], "latency_ms": record["after"]["latency_ms"],
            "seconds": time.perf_counter() - t0}


def run_depth(ckpt: Path, args, data_name: str) -> dict:
    """The most blocks whose counted MACs fit the budget (or the shallowest model, flagged)."""
    t0 = time.perf_counter()
    origin = load_origin(str(ckpt), settings(args, data_name, min_per_stage=0))
    n = len(origin.blocks)
    for keep in range(n, -1, -1):
        model, point = realise(origin, keep / n, 1.0, 1.0)
        if point.macs <= args.target * origin.macs:
            break
    row = {"d": point.d, "w": 1.0, "r": 1.0, "side": point.side, "feasible": point.macs <= args.target * origin.macs}
    return finish(model, origin, row, args, t0)


def run_resolution(ckpt: Path, args, data_name: str) -> dict:
    """The largest input side whose counted MACs fit the budget."""
    t0 = time.perf_counter()
    origin = load_origin(str(ckpt), settings(args, data_name))
    model = checkpoint.load(ckpt)
    side = origin.side
    while side > 8 and count(model, (origin.shape[0], side, side)).macs > args.target * origin.macs:
        side -= 1
    set_resolution(model, side)
    row = {"d": 1.0, "w": 1.0, "r": side / origin.side, "side": side,
           "feasible": count(model, (origin.shape[0], side, side)).macs <= args.target * origin.macs}
    return finish(model, origin, row, args, t0)


def table(rows: list[dict], baseline: dict, args) -> str:
    lines = [f"Unpruned: test accuracy {baseline['test_accuracy']:.2f}%, {baseline['macs'] / 1e6:.2f} M MACs. "
             f"Budget: {args.target:g} of the MACs; every final model fine-tuned {args.finetune_epochs} epochs "
             f"(lr {args.lr:g}, cosine) on the whole training split. 3-D search: {args.samples} samples, each "
             f"fine-tuned {args.sample_epochs} epoch(s) on {args.sample_images} images (search time listed).", "",
             "| variant | d | w | r (side) | kept MACs | params | val acc | test acc | delta test | speedup b1 / b64 | search s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    b1, b64 = baseline["latency_ms"]["batch1"]["median_ms"], baseline["latency_ms"]["batch64"]["median_ms"]
    for r in sorted(rows, key=lambda r: VARIANTS.index(r["variant"])):
        flag = "" if r["feasible"] else " (over budget)"
        lines.append(
            f"| {r['variant']}{flag} | {r['d']:.3f} | {r['w']:.3f} | {r['r']:.3f} ({r['side']}) | {r['macs_ratio']:.3f} | "
            f"{r['params']:,} | {r['val_accuracy']:.2f} | {r['test_accuracy']:.2f} | "
            f"{r['test_accuracy'] - baseline['test_accuracy']:+.2f} | "
            f"{b1 / r['latency_ms']['batch1']['median_ms']:.2f} / {b64 / r['latency_ms']['batch64']['median_ms']:.2f} | "
            f"{r.get('search_seconds', 0):.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="trained checkpoint (default: train a ResNet-20 into OUT/base)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--target", type=float, default=0.33)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sample-epochs", type=int, default=1)
    p.add_argument("--sample-images", type=int, default=2000)
    p.add_argument("--score-images", type=int, default=512)
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker-threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = train_base(args)
    data_name = checkpoint.read_header(ckpt)["meta"].get("dataset", {}).get("name") or args.data
    origin = load_origin(str(ckpt), settings(args, data_name))
    side = origin.side
    test = origin.data.loader("test", 256, resolution=None if side == origin.data.image_size else side)
    baseline = measure(origin.model, origin.shape, test, args.repeats)
    results = out / "results.jsonl"
    done = {json.loads(l)["variant"] for l in results.read_text().splitlines()} if results.exists() else set()
    runners = {"3d": run_3d, "width (hap)": run_width, "depth": run_depth, "resolution": run_resolution}
    for variant in args.variants.split(","):
        if variant in done:
            continue
        row = {"variant": variant, **runners[variant](ckpt, args, data_name)}
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{variant:12s}: test {row['test_accuracy']:.2f}%  MACs x{row['macs_ratio']:.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    (out / "results.json").write_text(json.dumps({"config": vars(args), "checkpoint": str(ckpt),
                                                  "baseline": baseline, "rows": rows}, indent=2) + "\n")
    (out / "table.md").write_text(table(rows, baseline, args))
    print(table(rows, baseline, args))


if __name__ == "__main__":
    main()
