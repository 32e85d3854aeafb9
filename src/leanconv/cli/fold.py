"""``leanconv fold CKPT --out OUT.safetensors``: the deployment form, BatchNorm folded into its conv.

Merge every inference BatchNorm into the conv whose output feeds only that BatchNorm (found
by tracing one forward pass), check that the folded model computes the same outputs
(relative difference at most {tolerance}), write it as a leanconv checkpoint and time both
at batch 64. The folded model is for inference: fine-tune the original.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from leanconv import checkpoint
from leanconv.cli.common import add_checkpoint_args, input_shape_of, load_model, repeats_arg
from leanconv.cost import count
from leanconv.cost.side_by_side import time_prepared
from leanconv.deploy.fold import TOLERANCE, fold
from leanconv.errors import LeanconvError
from leanconv.util.model_io import example_input

__all__ = ["HELP", "add_arguments", "run"]

HELP = "fold BatchNorm into the convs before it (the deployment form)"
DOC_FIELDS = {"tolerance": f"{TOLERANCE:g}"}  # filled into the --help text


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="where to write the folded checkpoint")
    p.add_argument("--repeats", type=repeats_arg, default=10, help="timed runs per model (default: 10)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.set_defaults(out_file="out")


def _side_by_side(model, folded, shape, repeats: int) -> dict:
    """Both models in eager PyTorch (channels_last, batch 64, one thread), timed in 7
    interleaved rounds: each one's median ms and the speedup (median over rounds, with the
    lowest and highest round)."""
    x = example_input(model, shape, batch_size=64).contiguous(memory_format=torch.channels_last)
    nets = {k: copy.deepcopy(m).eval().to(memory_format=torch.channels_last) for k, m in (("model", model),
                                                                                        ("folded", folded))}
    with torch.inference_mode():
        times = time_prepared({k: (lambda n=n: n(x)) for k, n in nets.items()}, threads=1, rounds=7,
                              repeats=repeats, warmup=3)
    rounds = np.median(times["model"], axis=1) / np.median(times["folded"], axis=1)
    return {"latency_b64_ms": [float(np.median(times[k])) for k in ("model", "folded")],
            "speedup_b64": float(np.median(rounds)), "speedup_b64_spread": [float(rounds.min()), float(rounds.max())],
            "timing": "eager PyTorch, channels_last, batch 64, 1 thread, 7 interleaved rounds"}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.resolve() == Path(args.ckpt).resolve():
        raise LeanconvError(f"--out {out} would overwrite the checkpoint being folded; choose another file")
    model = load_model(args.ckpt, constructor=args.constructor)
    shape = input_shape_of(model, args.input_shape)
    x = example_input(model, shape, batch_size=8)
    result = fold(model, x, tolerance=TOLERANCE)  # raises, writing nothing, if the outputs moved
    folded = result.model
    checkpoint.save(folded, out, constructor=args.constructor)
    before, after = count(model, shape), count(folded, shape)
    summary = {"out": str(out), "folded": [list(p) for p in result.pairs], "max_rel_diff": result.max_rel_diff,
               "params": [before.params, after.params], "macs": [before.macs, after.macs]}
    if not args.no_latency:
        summary.update(_side_by_side(model, folded, shape, args.repeats))
    print(json.dumps(summary))
    return 0
