"""``leanconv import``: a model class of your own and its trained weights -> a leanconv checkpoint.

Build the model with --constructor PKG.MODULE:FN (its keyword arguments from --arg KEY=VALUE),
load a state dict from --weights (a safetensors file, or a PyTorch file read with
torch.load(weights_only=True): never a full pickle) strictly, run it once on a zero input of
--input-shape to find its number of classes, and write a leanconv checkpoint that records the
constructor, the input shape, the classes and, with --data, the dataset. Every other command
then takes it with --constructor PKG.MODULE:FN.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.cli.common import add_model_args, classes_arg, parse_kwargs, parse_shape
from leanconv.errors import LeanconvError
from leanconv.models import from_constructor
from leanconv.runs.source import recorded_data
from leanconv.util.model_io import run_forward

__all__ = ["HELP", "add_arguments", "run"]

HELP = "turn your model class + a state-dict file into a leanconv checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="the trained state dict: .safetensors, or a torch.save file of tensors only")
    p.add_argument("--input-shape", type=parse_shape, required=True, metavar="C,H,W", help="one input image's shape")
    p.add_argument("--num-classes", type=classes_arg, default=None, metavar="K",
                   help="classes the model predicts (default: read off its output)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument of the constructor (repeatable; VALUE as JSON, else text)")
    p.add_argument("--data", default=None, help="the dataset it was trained on, recorded for later commands")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the system copy)")
    p.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint file to write (.safetensors)")
    p.set_defaults(out_file="out")


def run(args: argparse.Namespace) -> int:
    if not args.constructor:  # required here, optional in add_model_args' other uses
        raise LeanconvError("leanconv import needs --constructor PKG.MODULE:FN, the function or class that builds "
                            "the model")
    state = checkpoint.read_weights(args.weights)
    model = from_constructor(args.constructor, **parse_kwargs(args.arg))
    checkpoint.load_weights(model, state, repr(args.weights))
    model.eval()
    with torch.no_grad():
        out = run_forward(model, torch.zeros(1, *args.input_shape, dtype=next(model.parameters()).dtype))
    if not (torch.is_tensor(out) and out.dim() == 2):
        raise LeanconvError(f"the model's output is {getattr(out, 'shape', type(out).__name__)}, not [batch, "
                            "classes]; leanconv compresses classifiers")
    classes = int(out.shape[1])
    if args.num_classes is not None and args.num_classes != classes:
        raise LeanconvError(f"--num-classes {args.num_classes} disagrees with the model, which outputs {classes}")
    meta = {"input_shape": list(args.input_shape), "num_classes": classes,
            "imported": {"weights": str(Path(args.weights).resolve())}}
    if args.data is not None:
        data, folder = recorded_data(meta, args.data, args.data_dir)
        meta["dataset"] = {"name": data.name, "data_dir": None if folder is None else str(Path(folder).resolve())}
    model.leanconv_meta = meta
    checkpoint.save(model, args.out)
    print(json.dumps({"out": str(args.out), "constructor": args.constructor, "input_shape": list(args.input_shape),
                      "num_classes": classes, "tensors": len(state)}))
    return 0
