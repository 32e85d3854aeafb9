"""``leanconv profile MODEL_OR_CKPT``: params, MACs, FLOPs, activation memory, measured latency.

Count parameters, MACs and FLOPs (FLOPs = 2 x MACs) per layer and in total, the peak
activation memory for one image, and measure CPU latency at batch 1 and 64 (warm-up, median
of repeated runs, spread and thread count reported).
"""

from __future__ import annotations

import argparse
import json

from leanconv.cli.common import (add_build_args, add_model_args, classes_arg, input_shape_of, load_model, parse_kwargs,
                                 parse_shape, repeats_arg, threads_arg)
from leanconv.cost import format_profile, profile

__all__ = ["HELP", "add_arguments", "run"]


HELP = "parameters, MACs/FLOPs, memory and measured CPU latency"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_CKPT", help="a zoo model name (e.g. resnet20), PKG.MODULE:FN or a checkpoint file")
    add_model_args(p)
    add_build_args(p)
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="C,H,W",
                   help="input shape (default: the checkpoint's; 3,32,32 for zoo names)")
    p.add_argument("--num-classes", type=classes_arg, default=None,
                   help="classes, for a model built from a name (default: the model's own, 10 for the zoo)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--repeats", type=repeats_arg, default=20, help="timed runs per batch size (default: 20)")
    p.add_argument("--threads", type=threads_arg, default=None, help="CPU threads (default: PyTorch's)")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, constructor=args.constructor, input_shape=args.input_shape, kwargs=parse_kwargs(args.arg),
                       num_classes=args.num_classes)
    shape = input_shape_of(model, args.input_shape)
    result = profile(model, shape, latency=not args.no_latency, repeats=args.repeats, threads=args.threads)
    result["model"] = args.model
    print(json.dumps(result, indent=2) if args.json else format_profile(result))
    return 0
