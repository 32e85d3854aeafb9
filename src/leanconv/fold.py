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

Which pairs fold is found from one traced forward pass, not from module order: forward hooks
record each plain ``nn.Conv2d``'s output and each ``nn.BatchNorm2d``'s input, and the autograd
graph tells how many operations consume the conv's output. A pair folds only when the
BatchNorm's input *is* the conv's output tensor, nothing else reads that tensor (no residual
taken before the BatchNorm, not a model output), and each module runs exactly once per
forward. Anything else (a shared module, a leanconv sparse layer, an implant conv) is left as
it is, so the folded model always computes the same function, up to float rounding.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError

__all__ = ["fold_batchnorm", "foldable_pairs"]


def _tensors(value) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _consumers(outputs: Iterable[Tensor]) -> Counter:
    """How many graph edges point at each autograd node, counting a model output as one."""
    counts: Counter = Counter()
    seen, stack = set(), []
    for t in outputs:
        if t.grad_fn is not None:
            counts[t.grad_fn] += 1
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                counts[child] += 1
                stack.append(child)
    return counts


def foldable_pairs(model: nn.Module, example_input: Tensor) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` pairs that :func:`fold_batchnorm` would fold."""
    entries = list(model.named_modules(remove_duplicate=False))
    named = {m: n for n, m in entries}
    shared = {m for m, k in Counter(m for _, m in entries).items() if k > 1}  # registered under two names
    convs = [m for m in named if type(m) is nn.Conv2d]
    norms = [m for m in named if type(m) is nn.BatchNorm2d and m.track_running_stats]
    calls: Counter = Counter()
    conv_out: dict[nn.Module, Tensor] = {}
    norm_in: dict[nn.Module, Tensor] = {}

    def on_conv(module, _inputs, output):
        calls[module] += 1
        conv_out[module] = output

    def on_norm(module, inputs, _output):
        calls[module] += 1
        norm_in[module] = inputs[0]

    handles = [m.register_forward_hook(on_conv) for m in convs] + [m.register_forward_hook(on_norm) for m in norms]
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.enable_grad():
            x = example_input.detach().requires_grad_(True)
            outputs = list(_tensors(model(x)))
    finally:
        for h in handles:
            h.remove()
        for m, mode in was_training.items():
            m.training = mode
    uses = _consumers(outputs)
    producer = {id(out): conv for conv, out in conv_out.items()}
    pairs = []
    for norm, src in norm_in.items():
        conv = producer.get(id(src))
        if conv is None or any(calls[m] != 1 or m in shared for m in (conv, norm)):
            continue
        if src.grad_fn is not None and uses[src.grad_fn] == 1 and conv.out_channels == norm.num_features:
            pairs.append((named[conv], named[norm]))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var.to(torch.float64) + norm.eps)
    shift = -norm.running_mean.to(torch.float64) * scale
    if norm.affine:
        scale = scale * norm.weight.to(torch.float64)
        shift = shift * norm.weight.to(torch.float64) + norm.bias.to(torch.float64)
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight.to(torch.float64) * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight.copy_(weight.to(conv.weight.dtype))
    new_bias = (bias * scale + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module, example_input: Tensor, *, inplace: bool = False) -> nn.Module:
    """The model with every foldable Conv2d -> BatchNorm2d pair merged (see the module docstring).

    Returns a copy unless ``inplace``; the result is in eval mode, since a folded BatchNorm no
    longer normalises batches (train it again from the unfolded model). ``example_input`` is
    one batch of the model's input (any batch size) used to trace which pairs fold."""
    if not isinstance(model, nn.Module):
        raise LeanconvError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    net = model if inplace else copy.deepcopy(model)
    for conv_name, norm_name in foldable_pairs(net, example_input):
        _fold_into(net.get_submodule(conv_name), net.get_submodule(norm_name))
        parent, _, leaf = norm_name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
    return net.eval()
