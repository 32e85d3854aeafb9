"""``leanconv eval CKPT``: accuracy and loss on a split of the model's dataset.

Evaluate a checkpoint on the dataset and input shape it was trained with (override with
--data/--data-dir).
"""

from __future__ import annotations

import argparse
import json

from leanconv.cli.common import add_checkpoint_args, add_data_args, data_from_meta, load_model, resolution_of
from leanconv.train import evaluate

__all__ = ["HELP", "add_arguments", "run"]


HELP = "accuracy and loss of a checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    add_data_args(p, default=None)
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.ckpt, constructor=args.constructor)
    if args.input_shape is not None:
        model.leanconv_meta = {**model.leanconv_meta, "input_shape": list(args.input_shape)}
    data = data_from_meta(model, args)
    shape = model.leanconv_meta.get("input_shape")
    loader = data.loader(args.split, args.batch_size, resolution=resolution_of(model, data))
    metrics = evaluate(model, loader)
    result = {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "n": metrics["n"],
              "split": args.split, "dataset": data.name, "input_shape": shape}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.split} accuracy {metrics['accuracy']:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['n']} images of {data.name}, input {shape})")
    return 0
