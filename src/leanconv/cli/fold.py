"""``leanconv fold CKPT --out OUT.safetensors``: the deployment form, BatchNorm folded into its conv.

Merge every inference BatchNorm into the conv whose output feeds only that BatchNorm (found
by tracing one forward pass), check that the folded model computes the same outputs
(relative difference at most {tolerance}), write it as a leanconv checkpoint and time both
at batch 64. The folded model is for inference: fine-tune the original.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanconv import checkpoint
from leanconv.cli.common import add_checkpoint_args, input_shape_of, load_model, repeats_arg
from leanconv.cost import count, measure_fastest_layout
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
        times = [measure_fastest_layout(m, shape, 64, repeats=args.repeats, warmup=3).median_ms for m in (model, folded)]
        summary.update({"latency_b64_ms": times, "speedup_b64": times[0] / times[1]})
    print(json.dumps(summary))
    return 0
