"""``leanconv train``: train a zoo model (or continue from a checkpoint) on a dataset.

Train a zoo model from scratch, or a checkpoint (--from) from its current weights (e.g. a
converted SCC/pSConv model). Writes DIR/model.safetensors, DIR/metrics.jsonl (one line per
epoch) and DIR/config.json.

Launched by ``torchrun`` (``torchrun --nproc_per_node N -m leanconv.cli.main train ...``) it
trains data-parallel: every process joins the group, trains on its shard of the training
set, and only rank 0 writes files and prints. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.cli.common import (DEFAULT_DATA, add_build_args, add_data_args, add_model_args, data_from_meta,
                                 epochs_arg, load_model, non_negative_float, number_in, parse_kwargs, positive_float,
                                 positive_int, progress_bar, recorded_data_dir, resolution_of, seed_arg, side_arg,
                                 threads_arg)
from leanconv.data import load_dataset
from leanconv.errors import LeanconvError
from leanconv.train import TrainConfig, evaluate, fit, recalibrate_on_training_data
from leanconv.train.loop import check_loader
from leanconv.train import distributed as dist
from leanconv.util.fileset import write_together
from leanconv.util.inputs import input_file
from leanconv.util.limits import MAX_EPOCHS, MAX_LR, MAX_SIDE, MAX_THREADS, SEED_MAX
from leanconv.util.model_io import check_classes, check_trainable

__all__ = ["HELP", "add_arguments", "run", "config_from_args", "loaders_for", "CHECKSUM_ENV"]

# Debugging aid (used by the tests): when set, every process writes the SHA-256 of its final
# weights to DIR/checksum.rank<R>.txt, so that identical replicas can be verified.
CHECKSUM_ENV = "LEANCONV_DEBUG_CHECKSUMS"


HELP = "train a model; writes DIR/model.safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, metavar="NAME|PKG.MODULE:FN",
                     help="a zoo model, or your own constructor (default: resnet20)")
    src.add_argument("--from", dest="from_ckpt", default=None, metavar="CKPT", help="start from this checkpoint")
    add_model_args(p)
    add_build_args(p)
    add_data_args(p, default=None, default_help=f"with --from, the checkpoint's; else {DEFAULT_DATA}")
    p.add_argument("--epochs", type=epochs_arg, default=10, help=f"epochs, 1 to {MAX_EPOCHS} (default: 10)")
    p.add_argument("--lr", type=positive_float, default=0.1,
                   help=f"peak learning rate, up to {MAX_LR:g} (default: 0.1)")
    p.add_argument("--momentum", type=number_in(at_least=0, below=1), default=0.9,
                   help="SGD momentum, in [0, 1) (default: 0.9)")
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4,
                   help=f"L2 weight decay, 0 to {MAX_LR:g} (default: 5e-4)")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument("--seed", type=seed_arg, default=0, help=f"random seed, 0 to {SEED_MAX} (default: 0)")
    p.add_argument("--resolution", type=side_arg, default=None,
                   help=f"train at this input side, 1 to {MAX_SIDE} (default: the data's)")
    p.add_argument("--train-subset", "--subset", dest="subset", type=positive_int, default=None, metavar="N",
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--no-augment", action="store_true", help="turn off random crop and flip")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="after training, re-estimate BatchNorm statistics on up to 6,400 un-augmented training "
                   "images (what prune and compare do after fine-tuning)")
    p.add_argument("--threads", type=threads_arg, default=None,
                   help=f"CPU threads per process, 1 to {MAX_THREADS} (default: PyTorch's)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: SyncBatchNorm across processes (default: BatchNorm per process)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(out_is_folder=True)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                       schedule=args.schedule, seed=args.seed, threads=args.threads, sync_bn=args.sync_bn)


def loaders_for(data, batch_size: int, *, resolution: int | None, seed: int, augment: bool = True,
                subset: int | None = None, rank: int = 0, world_size: int = 1):
    """Train (shuffled, augmented), validation and test loaders at ``resolution``.

    The training loader yields this process's shard (``rank`` of ``world_size``) with
    ``batch_size`` images per batch per process; validation and test are whole (evaluation
    splits them by batches)."""
    train = data.loader("train", batch_size, shuffle=True, augment=augment, resolution=resolution, seed=seed,
                        subset=subset, drop_last=True, rank=rank, world_size=world_size)
    val = data.loader("val", 256, resolution=resolution)
    test = data.loader("test", 256, resolution=resolution)
    return train, val, test


def _model_and_data(args: argparse.Namespace):
    """The model to train and its data. A checkpoint (``--from``) trains on the data it records
    unless ``--data`` says otherwise, and the data must fit it (channels, classes)."""
    if args.from_ckpt:
        model = load_model(args.from_ckpt, constructor=args.constructor)
        check_trainable(model, args.from_ckpt)
        data = data_from_meta(model, args)
        recorded = model.leanconv_meta.get("input_shape")
        side = args.resolution or (recorded[1] if recorded else data.image_size)
        shape = tuple(recorded) if recorded and args.resolution is None else (data.in_channels, side, side)
        return _with_meta(model, data, shape, args), data
    data = load_dataset(args.data or DEFAULT_DATA, args.data_dir)
    side = args.resolution or data.image_size
    torch.manual_seed(args.seed)
    model = load_model(args.model or "resnet20", kwargs=parse_kwargs(args.arg),
                       input_shape=(data.in_channels, side, side), num_classes=data.num_classes)
    check_classes(model, (data.in_channels, side, side), data.num_classes)
    return _with_meta(model, data, (data.in_channels, side, side), args), data


def _with_meta(model, data, shape, args):
    meta = dict(getattr(model, "leanconv_meta", {}))
    folder = recorded_data_dir(meta, args)
    meta.update({"input_shape": list(shape), "num_classes": data.num_classes,  # the folder absolute: usable anywhere
                 "dataset": {"name": data.name, "data_dir": None if folder is None else str(Path(folder).resolve())}})
    model.leanconv_meta = meta
    return model


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.resume and not (out / "train_state.safetensors").exists():
        raise LeanconvError(f"nothing to resume in {out}: no train_state.safetensors; drop --resume")
    if args.from_ckpt:
        input_file(args.from_ckpt, "checkpoint")
    rank, world = dist.init_from_env()
    try:
        return _train(args, out, rank, world)
    finally:
        dist.cleanup()


def _train(args: argparse.Namespace, out: Path, rank: int, world: int) -> int:
    config = config_from_args(args)
    model, data = _model_and_data(args)
    train, val, test = loaders_for(data, args.batch_size, resolution=resolution_of(model, data), seed=args.seed,
                                   augment=not args.no_augment, subset=args.subset, rank=rank, world_size=world)
    main = rank == 0
    check_loader(train)
    # config.json goes with every epoch's file set: a refused or killed run leaves the folder as it was
    record = {"command": "train", "args": {k: v for k, v in vars(args).items() if k != "func"},
              "train_config": asdict(config), "model": model.leanconv_base, "world_size": world}
    update, close = progress_bar(f"train {args.model or args.from_ckpt}", enabled=main and not args.no_progress)
    try:
        result = fit(model, train, config, val_loader=val, out_dir=out, resume=args.resume, progress=update,
                     extra_files={"config.json": json.loads(json.dumps(record, default=str))})
    finally:
        close()
    if args.recalibrate_bn:
        recalibrate_on_training_data(model, data, resolution_of(model, data))
    metrics = evaluate(model, test, config.channels_last, distributed=world > 1)
    model.leanconv_meta["test"] = {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}
    if os.environ.get(CHECKSUM_ENV):
        (out / f"checksum.rank{rank}.txt").write_text(dist.state_checksum(model) + "\n")
    if main:
        write_together(out, {"model.safetensors": lambda p: checkpoint.save(model, p)})
        summary = {"test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"], "epochs_run": result.epochs_run,
                   "seconds": round(result.seconds, 1), "model": str(out / "model.safetensors")}
        print(json.dumps(summary))
    dist.barrier()
    return 0
