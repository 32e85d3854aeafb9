"""Time per training step: leanconv's ``fit`` versus a bare PyTorch loop, side by side.

Both train the same model on the same Fashion-MNIST batches (augmentation on, channels_last,
SGD with momentum); the bare loop gets pre-made batches from the same loader, so the ratio
shows the overhead of leanconv's loop (schedule, NaN check, metrics, progress) plus nothing
else. Runs alternate (bare, leanconv, bare, ...) so machine drift hits both.

    .venv/bin/python benchmarks/bench_train_loop.py --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from leanconv.data import load_dataset
from leanconv.models import create
from leanconv.train import TrainConfig, fit


def bare_loop(model, batches) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()
    t0 = time.perf_counter()
    for x, y in batches:
        x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / len(batches)


def leanconv_loop(model, loader) -> float:
    t0 = time.perf_counter()
    fit(model, loader, TrainConfig(epochs=1, lr=0.05, threads=torch.get_num_threads()))
    return (time.perf_counter() - t0) / len(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--out", default=None, help="write a JSON record here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    loader = data.loader("train", args.batch_size, shuffle=True, augment=True, drop_last=True,
                         subset=args.steps * args.batch_size)
    batches = list(loader.epoch(0))
    make = lambda: create(args.model, num_classes=10, in_channels=1, input_size=28).to(memory_format=torch.channels_last)
    bare_loop(make(), batches[:3])  # warm-up
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_loop(make(), batches))
        ours.append(leanconv_loop(make(), loader))
    record = {"model": args.model, "batch_size": args.batch_size, "steps": len(batches), "threads": torch.get_num_threads(),
              "bare_ms_per_step": [1000 * t for t in bare], "leanconv_ms_per_step": [1000 * t for t in ours],
              "ratio_median": statistics.median(ours) / statistics.median(bare)}
    print(f"{args.model} batch {args.batch_size}, {len(batches)} steps, {record['threads']} threads")
    print(f"bare PyTorch loop : {statistics.median(bare) * 1000:8.1f} ms/step (median of {args.rounds})")
    print(f"leanconv fit      : {statistics.median(ours) * 1000:8.1f} ms/step (median of {args.rounds})")
    print(f"ratio leanconv / bare: {record['ratio_median']:.3f}  (target <= 1.3)")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
