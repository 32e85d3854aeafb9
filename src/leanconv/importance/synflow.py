"""SynFlow: data-free channel importance by synaptic flow (``synflow``).

Tanaka, Kunin, Yamins, Ganguli, "Pruning neural networks without any data by iteratively
conserving synaptic flow", NeurIPS 2020. Replace every parameter by its absolute value, feed
an all-ones input ``1``, and let ``R = 1^T (prod_l |W_l|) 1 = sum(output)`` (their Eq. 2,
the synaptic flow objective); a parameter's score is ``S(theta) = theta * dR/dtheta``
(Eq. 1 with ``R`` for the loss). leanconv scores group channel ``k`` by the sum of
``|theta| * dR/dtheta`` over the filter/row ``W[idxs[k]]`` of each conv/linear ``"out"``
member (weights only, as the paper scores weights), summed over the members. This is the
one-shot score; the paper's iterative schedule (density ``rho^(k/n)``) belongs to the
pruning loop, which may call this criterion repeatedly.

Numerics: ``R`` grows like the product of the layers' gains, which overflows float32 in
deep nets (about 6^56 for 56 stacked 3x3 convs of 16 channels at PyTorch's default init), so the computation
runs on a float64 copy of the model, and the scores are divided by ``R``. For a bias-free
net the paper's conservation law (Thm. 2) makes the scores of each layer sum to ``R``, so
the divided scores are the fraction of the flow through each channel; dividing by one
global constant keeps the global ranking. Still non-finite in float64: raise.

BatchNorm: in eval mode a BN layer is the per-channel affine map ``y = a x + b`` with
``a = gamma / sqrt(var + eps)`` and ``b = beta - a * mean``. Taking the absolute value of
``gamma``, ``beta`` and the running statistics one by one would keep the subtraction of the
mean, so activations could turn negative and ReLUs would cut paths, which breaks the
linearisation SynFlow relies on. Instead each BN becomes ``|a| x + |b|``: the same
absolute-value rule applied to the affine map BN really is.

Activations: with positive parameters and input every activation is positive, where a ReLU
is the identity; that is what makes the paper's ``R`` a path sum. A *bounded* activation
(ReLU6, Hardtanh) would instead saturate on the huge positive activations and cut the
gradient to zero everywhere upstream (every MobileNetV2 channel would score 0). So the copy
replaces the elementwise activation modules (ReLU, ReLU6, Hardtanh, LeakyReLU, PReLU, ELU,
CELU, SELU, GELU, SiLU, Hardswish, Mish, Softplus) by the identity, their behaviour on large
positive inputs up to a constant. Gates (Sigmoid, Hardsigmoid) and activations applied as
functions inside ``forward`` stay as they are. Other layers keep their behaviour with
absolute parameters. The model itself is never modified.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.graph.types import ChannelGroup, Member
from leanconv.importance.base import Criterion, ScoringData, register_criterion
from leanconv.importance.scoring import channel_entries, is_weight_layer, member_module, sum_over_members, to_scores
from leanconv.util.model_io import model_device

__all__ = ["SynFlow", "synflow", "linearized_copy", "input_shape_for"]

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Softplus,
)


def input_shape_for(model: nn.Module, data: ScoringData | None) -> tuple[int, ...]:
    """One input's shape: ``data.extra['input_shape']``, else the first batch's ``shape[1:]``,
    else ``model.leanconv_meta['input_shape']``."""
    if data is not None and data.extra.get("input_shape"):
        return tuple(int(d) for d in data.extra["input_shape"])
    if data is not None and len(data.batches):
        return tuple(int(d) for d in data.batches[0][0].shape[1:])
    meta = getattr(model, "leanconv_meta", None) or {}
    if meta.get("input_shape"):
        return tuple(int(d) for d in meta["input_shape"])
    raise LeanconvError("synflow needs the input shape: pass data with extra['input_shape'] or one batch")


@torch.no_grad()
def _fold_batchnorm_abs(bn: nn.modules.batchnorm._BatchNorm, name: str) -> None:
    """Make an eval-mode BN compute ``|a| x + |b|`` (module docstring), in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise LeanconvError(f"synflow: BatchNorm {name} keeps no running statistics; it cannot be linearised")
    std = (bn.running_var + bn.eps).sqrt()
    if bn.affine:
        shift = bn.bias - bn.weight * bn.running_mean / std
        bn.weight.abs_()
        bn.bias.copy_(shift.abs())
        bn.running_mean.zero_()
    else:  # (x - m) / s with m = -|mean| is x / s + |mean| / s = |a| x + |b|
        bn.running_mean.copy_(-bn.running_mean.abs())


def linearized_copy(model: nn.Module) -> nn.Module:
    """A float64, eval-mode deep copy with every parameter replaced by its absolute value,
    every BatchNorm folded to ``|a| x + |b|`` and every activation module replaced by the
    identity (module docstring); all parameters require grad."""
    lin = copy.deepcopy(model).double().eval()
    for name, m in list(lin.named_modules()):
        if name and isinstance(m, _ACTIVATIONS):
            parent, _, child = name.rpartition(".")
            setattr(lin.get_submodule(parent), child, nn.Identity())
    with torch.no_grad():
        for name, m in lin.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _fold_batchnorm_abs(m, name)
        for p in lin.parameters():
            p.abs_()
    for p in lin.parameters():
        p.requires_grad_(True)
    return lin


class SynFlow(Criterion):
    """``|theta| * dR/dtheta / R`` summed over each channel's weights (Tanaka et al. 2020)."""

    name = "synflow"
    needs_data = False

    def __call__(
        self, model: nn.Module, groups: Sequence[ChannelGroup], data: ScoringData | None = None
    ) -> list[Tensor]:
        shape = input_shape_for(model, data)
        lin = linearized_copy(model)
        weights = _out_weights(lin, groups)
        with torch.enable_grad():
            out = lin(torch.ones((1, *shape), dtype=torch.float64, device=model_device(model)))
            if not isinstance(out, Tensor):
                raise LeanconvError("synflow: the model must return one tensor")
            flow = out.sum()
            if not torch.isfinite(flow) or flow <= 0:
                raise LeanconvError(f"synflow: the synaptic flow R = {float(flow)} is not finite and positive in float64")
            grads = torch.autograd.grad(flow, list(weights.values()), allow_unused=True)
        scores = {
            k: (w.detach() * g / flow.detach()) if g is not None else torch.zeros_like(w)
            for (k, w), g in zip(weights.items(), grads)
        }

        def score(module: nn.Module, member: Member) -> Tensor | None:
            s = scores.get(member.module)
            return None if s is None else channel_entries(module, member, s).sum(1)

        totals = [sum_over_members(lin, g, score, ("out",), self.name) for g in groups]
        return to_scores(totals, groups, self.name)


def _out_weights(lin: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, Tensor]:
    """Module path -> weight of every conv/linear out member, in the linearised copy."""
    out = {}
    for g in groups:
        for member in g.out_members():
            module = member_module(lin, member, g)
            if is_weight_layer(module):
                out[member.module] = module.weight
    return out


@register_criterion("synflow")
def synflow() -> SynFlow:
    """Data-free synaptic flow (Tanaka et al. 2020)."""
    return SynFlow()
