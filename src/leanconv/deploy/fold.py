"""Fold inference-mode BatchNorm into the convolution that feeds it (the deployment form).

In eval mode a BatchNorm is a per-channel affine map, ``y = (x - mean) / sqrt(var + eps) *
gamma + beta``, so a conv whose output goes *only* to that BatchNorm can absorb it:

    s = gamma / sqrt(var + eps)        (per output channel)
    W' = W * s                         (scales each output filter)
    b' = (b - mean) * s + beta         (b = 0 when the conv had no bias)

and the BatchNorm becomes ``nn.Identity``. Every deployment runtime does this (ONNX Runtime,
TorchScript freezing, OpenVINO); doing it in PyTorch makes eager latency measure the same
network a deployment runs. BatchNorm counts 0 MACs in leanconv's profiler either way; folding
removes its memory passes, which do not shrink with a MAC reduction as fast as the convs do.

Which pairs fold is found from one forward pass on an example batch, not from module order.
Forward hooks record each plain ``nn.Conv2d``'s output (and each ``PeriodicSparseConv2d``'s
and ``SlidingChannelConv2d``'s: their nonzeros scale the same way and they take the bias) and
each ``nn.BatchNorm2d``'s input, and a ``TorchFunctionMode`` counts every torch operation that
reads a conv's output (a comparison, an in-place op and ``detach`` count; shape queries do
not). A pair folds only when the BatchNorm's input *is* the conv's output tensor, unmodified,
that BatchNorm is its only reader and it is not a model output, each module runs exactly once
per forward, is registered under one name and carries no user hooks. Anything else (a shared
module, an implant conv, a BatchNorm before its conv) is left as it is. The folded model is
then run on the example batch and must match the original to ``1e-4`` relative, or
:class:`~leanconv.errors.LeanconvError` is raised and nothing is returned.

A float16 (or bfloat16) model is folded and checked on a float32 copy (its weights convert
exactly), then stored back in its own dtype: its 11-bit mantissa alone differs by ~1e-3
relative, which no check at ``1e-4`` could tell from a wrong fold. float32 and float64 models
are folded and checked in their own dtype. The example batch follows the model's dtype.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from leanconv.errors import LeanconvError
from leanconv.layers.periodic_sparse import PeriodicSparseConv2d
from leanconv.layers.sliding_channel import SlidingChannelConv2d
from leanconv.util.model_io import LOW_PRECISION, model_dtype, to_model
from leanconv.util.modes import eval_mode

__all__ = ["FoldResult", "fold", "fold_batchnorm", "foldable_pairs", "FOLDS_INTO"]

FOLDS_INTO = (nn.Conv2d, PeriodicSparseConv2d, SlidingChannelConv2d)  # exact types a BatchNorm folds into
TOLERANCE = 1e-4  # largest accepted |folded - original| over the largest |original| output

# Tensor methods that read only metadata, never values: they do not block a fold.
_METADATA = {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "is_floating_point",
             "element_size", "nelement", "ndimension", "storage_offset", "get_device", "__len__"}


def _tensors(value) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _Reads(TorchFunctionMode):
    """Counts the operations that read each watched tensor (kept alive here, so ids are unique)."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, Tensor] = {}
        self.reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched and getattr(func, "__name__", "") not in _METADATA:
            for t in _tensors((args, kwargs)):
                if id(t) in self.watched:
                    self.reads[id(t)] += 1
        return func(*args, **kwargs)


def _trace(model: nn.Module, example_input: Tensor, convs: list, norms: list):
    """One eval forward pass: each conv's output, each BN's input, calls, reads, model outputs."""
    reads, calls = _Reads(), Counter()
    conv_out: dict[nn.Module, tuple[Tensor, int]] = {}
    norm_in: dict[nn.Module, tuple[Tensor, int]] = {}

    def on_conv(module, _inputs, output):
        calls[module] += 1
        if isinstance(output, Tensor):
            conv_out[module] = (output, output._version)
            reads.watched[id(output)] = output

    def on_norm(module, inputs):
        calls[module] += 1
        if inputs and isinstance(inputs[0], Tensor):
            norm_in[module] = (inputs[0], inputs[0]._version)

    handles = [m.register_forward_hook(on_conv) for m in convs] + [m.register_forward_pre_hook(on_norm) for m in norms]
    try:
        # normal tensors even under a caller's inference_mode: version counters tell in-place writes
        with eval_mode(model), torch.inference_mode(False), torch.no_grad():
            x = example_input.clone()
            with reads:
                outputs = {id(t) for t in _tensors(model(x))}
    finally:
        for h in handles:
            h.remove()
    return conv_out, norm_in, calls, reads.reads, outputs


def foldable_pairs(model: nn.Module, example_input: Tensor) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` pairs that :func:`fold_batchnorm` folds (module docstring)."""
    entries = list(model.named_modules(remove_duplicate=False))
    named = {m: n for n, m in entries}
    shared = {m for m, k in Counter(m for _, m in entries).items() if k > 1}  # registered under two names
    hooked = {m for m in named if m._forward_hooks or m._forward_pre_hooks}
    convs = [m for m in named if type(m) in FOLDS_INTO and m not in shared | hooked]
    norms = [m for m in named if type(m) is nn.BatchNorm2d and m.track_running_stats and m not in shared | hooked]
    conv_out, norm_in, calls, reads, outputs = _trace(model, example_input, convs, norms)
    producer = {id(t): (conv, version) for conv, (t, version) in conv_out.items()}
    pairs = []
    for norm, (src, version) in norm_in.items():
        conv, made = producer.get(id(src), (None, None))
        if conv is None or calls[conv] != 1 or calls[norm] != 1 or version != made:
            continue
        if reads[id(src)] == 1 and id(src) not in outputs and conv.out_channels == norm.num_features:
            pairs.append((named[conv], named[norm]))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Module, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var.to(torch.float64) + norm.eps)
    shift = -norm.running_mean.to(torch.float64) * scale
    if norm.affine:
        scale = scale * norm.weight.to(torch.float64)
        shift = shift * norm.weight.to(torch.float64) + norm.bias.to(torch.float64)
    if isinstance(conv, PeriodicSparseConv2d):  # the flat nonzeros: each scaled by its output filter's factor
        weight = conv.weight_nz
        per_weight = scale[torch.div(conv.nz_index, conv.in_channels * 9, rounding_mode="floor")]
    elif isinstance(conv, SlidingChannelConv2d):  # [out, window]: one row per output channel
        weight = conv.weight
        per_weight = scale[:, None]
    else:
        weight = conv.weight
        per_weight = scale.view(-1, *([1] * (weight.dim() - 1)))
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(scale)
    weight.copy_((weight.to(torch.float64) * per_weight).to(weight.dtype))
    new_bias = (bias * scale + shift).to(weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _max_rel_diff(a, b) -> float:
    pairs = list(zip(_tensors(a), _tensors(b)))
    if not pairs:
        return 0.0
    return max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)) if x.numel() else 0.0
               for x, y in pairs)


@dataclass(frozen=True)
class FoldResult:
    """The folded copy, the ``(conv, batchnorm)`` names folded, and the largest output
    difference on the example batch relative to the largest original output."""

    model: nn.Module
    pairs: list[tuple[str, str]]
    max_rel_diff: float


def fold(model: nn.Module, example_input: Tensor, *, tolerance: float = TOLERANCE) -> FoldResult:
    """Fold every foldable Conv2d -> BatchNorm2d pair of a copy of ``model`` and check it.

    ``example_input`` is one batch of the model's input (any batch size): it traces which
    pairs fold and then checks the folded copy against the original. The copy is in eval
    mode (a folded BatchNorm no longer normalises batches: fine-tune the original)."""
    if not isinstance(model, nn.Module):
        raise LeanconvError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    dtype = model_dtype(model)
    if dtype in LOW_PRECISION:  # folded and checked in float32, stored back (module docstring)
        model = copy.deepcopy(model).float()
    x = to_model(example_input, model)
    net = copy.deepcopy(model)
    pairs = foldable_pairs(net, x)
    for conv_name, norm_name in pairs:
        _fold_into(net.get_submodule(conv_name), net.get_submodule(norm_name))
        parent, _, leaf = norm_name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
    net.eval()
    with eval_mode(model), torch.no_grad():
        diff = _max_rel_diff(model(x), net(x))
    if not diff <= tolerance:
        raise LeanconvError(f"folding BatchNorm changed the model's outputs by {diff:.3g} (relative, limit "
                            f"{tolerance:g}); the model reads a conv output in a way leanconv did not see. "
                            "Use the unfolded model")
    return FoldResult(net.to(dtype), pairs, diff)


def fold_batchnorm(model: nn.Module, example_input: Tensor) -> nn.Module:
    """A checked copy of ``model`` with its foldable BatchNorms folded (see :func:`fold`)."""
    return fold(model, example_input).model
