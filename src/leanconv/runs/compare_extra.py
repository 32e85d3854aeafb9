"""The contenders of ``compare`` that are not width criteria: 3-D pruning and new layer types.

Each runner takes ``(ctx, key, method, target)`` and returns ``(model, info)`` where ``info``
holds ``family``, ``command``, ``notes`` (and ``label`` for layer variants); ``compare``
saves, exports and measures the model.
"""

from __future__ import annotations

import shlex
from typing import Any, Callable

import torch
from torch import nn

from leanconv.errors import LeanconvError

__all__ = ["runner", "three_d_entry", "layer_entry"]


def three_d_entry(ctx, key: str, method: str, target: float) -> tuple[nn.Module, dict[str, Any]]:
    """3-D pruning (depth x width x resolution) to ``target`` of the MACs, samples collected
    in-process, final fine-tuning with the comparison's epochs on the whole training split
    (as ``leanconv prune3d`` does; a ``train_subset`` only caps the sample fine-tuning)."""
    from leanconv.prune3d.three_d import Prune3dConfig, run_prune3d

    c = ctx.config
    images = min(c.train_subset, 2000) if c.train_subset is not None else 2000
    config = Prune3dConfig(target=target, samples=c.samples, sample_epochs=1, sample_images=images,
                           finetune_epochs=c.finetune_epochs, lr=c.finetune_lr, score_images=c.score_images,
                           probes=c.probes, seed=c.seed, latency_repeats=2)
    out = ctx.out / "entries" / key
    result = run_prune3d(ctx.ckpt, out, config, data=ctx.data.name, data_dir=ctx.data_dir, progress=ctx.progress)
    choice = result.record["choice"]["realised"]
    args = ["leanconv", "prune3d", str(ctx.ckpt), "--target-flops", f"{target:g}", "--samples", str(c.samples),
            "--sample-images", str(images), "--finetune-epochs", str(c.finetune_epochs), "--lr", f"{c.finetune_lr:g}",
            "--probes", str(c.probes), "--score-images", str(c.score_images), "--seed", str(c.seed),
            *ctx.data_args(), "--out", str(out)]
    notes = (f"d={choice.get('d', float('nan')):.2f} w={choice.get('w', float('nan')):.2f} "
             f"side={choice.get('side', '?')}; {c.samples} samples")
    if c.train_subset is not None:  # prune3d has no option for it: say so rather than show a wrong command
        notes += f"; final fine-tuning on all training images (train subset {c.train_subset}: sampling only)"
    return result.model, {"family": "3d", "command": shlex.join(args), "notes": notes}


LAYER_LR = 0.05  # converted layers start from random weights: they need more than a fine-tuning rate


def layer_entry(ctx, key: str, method: str, target: float | None) -> tuple[nn.Module, dict[str, Any]]:
    """Swap layers for sliding-channel (``scc``: depthwise kxk + SCC) or periodic sparse
    (``psconv``) convolutions, keep every other trained weight, and train for the comparison's
    fine-tuning epochs (learning rate at least ``LAYER_LR``, cosine)."""
    from leanconv.convs.convert import convert
    from leanconv.train import finetune

    c = ctx.config
    with torch.random.fork_rng(devices=[]):  # new layers start as `leanconv convert --seed` starts them
        torch.manual_seed(c.seed)
        model = ctx.fresh_model()
        if method == "scc":
            convert(model, "scc", groups=c.scc_groups, overlap=c.scc_overlap)
            label, opts = f"scc g={c.scc_groups} o={c.scc_overlap:g}", ["--groups", str(c.scc_groups),
                                                                         "--overlap", f"{c.scc_overlap:g}"]
        else:
            convert(model, "psconv", pattern=c.psconv_pattern)
            label, opts = f"psconv {c.psconv_pattern}", ["--pattern", c.psconv_pattern]
    lr = max(c.finetune_lr, LAYER_LR)
    finetune(model, ctx.data, epochs=c.finetune_epochs, lr=lr, seed=c.seed, resolution=ctx.resolution,
             images=c.train_subset, progress=ctx.progress)
    out = ctx.out / "entries" / key
    images = len(ctx.data.train) if c.train_subset is None else min(c.train_subset, len(ctx.data.train))
    subset = ["--subset", str(c.train_subset)] if c.train_subset is not None else []
    subset += ["--batch-size", str(images)] if images < 128 else []  # finetune's batch: min(128, images)
    command = (shlex.join(["leanconv", "convert", str(ctx.ckpt), *ctx.constructor_args(), "--to", method, *opts,
                           "--seed", str(c.seed), "--out", f"{out}/converted"])
               + " && " + shlex.join(["leanconv", "train", "--from", f"{out}/converted/model.safetensors",
                                      *ctx.constructor_args(), *ctx.data_args(), "--epochs", str(c.finetune_epochs),
                                      "--lr", f"{lr:g}", *subset, "--seed", str(c.seed), "--recalibrate-bn",
                                      "--out", str(out)]))
    notes = (f"converted layers trained {c.finetune_epochs} epochs at lr {lr:g}; other weights from the baseline; "
             "BatchNorm statistics then re-estimated")
    return model, {"family": "layer", "command": command, "notes": notes, "label": label}


_RUNNERS: dict[str, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {
    "3d": three_d_entry, "scc": layer_entry, "psconv": layer_entry}


def runner(method: str) -> Callable[..., tuple[nn.Module, dict[str, Any]]]:
    if method not in _RUNNERS:
        raise LeanconvError(f"compare has no runner for {method!r}")
    return _RUNNERS[method]
