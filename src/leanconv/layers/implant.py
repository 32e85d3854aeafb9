"""Neural Implant: a pruned kxk conv plus a cheap 1x1 conv that stands in for some filters.

Paper: Yu, Yao, Gholami et al., "Hessian-Aware Pruning and Optimal Neural Implant" (WACV
2022), section 3.3. Of the channels that Hessian-aware pruning would remove, the most
sensitive ones are not removed but *implanted*: their kxk filters are replaced by a 1x1
pointwise conv that reads every (kept) input channel and starts at zero, so the network
keeps the channel's downstream weights and fine-tuning grows the implant back. A 1x1 filter
costs ``k*k`` times fewer MACs and parameters than the kxk filter it replaces.

Layout (our choice): ``conv`` holds the kept kxk filters and ``implant`` the 1x1 filters;
the output is ``cat([conv(x), implant(x)], dim=1)`` re-ordered by ``channel_order``, a list
with ``channel_order[c]`` = position in that concatenation of output channel ``c``. The
order lets implanted channels stay where the original conv had them, so downstream layers
are untouched; ``None`` means the plain concatenation ``[kept..., implanted...]``.
:func:`leanconv.width.permute.fold_channel_orders` moves the channels of the surrounding
layers instead, so that pruned models end with ``None`` wherever that is possible.

The implant reads the input tap at the centre of the kxk window (padding
``p - d*(k-1)/2``; a negative value crops the input), so its output has the kxk conv's
spatial size for any stride, padding and dilation. Kernel sides must be odd.

Cost (one call, whole batch): ``N*H_out*W_out*(kept*C_in*kh*kw + implanted*C_in)`` MACs
(:meth:`ImplantConv2d.count_macs`, the paper's accounting); the re-ordering counts 0 MACs.

Execution (same outputs, chosen for speed; ``execution`` = ``"auto"``, ``"dense"`` or
``"split"``). *Split* runs the two convs and concatenates them (by runs of consecutive
channels when re-ordered: one copy, no gather). *Dense* runs one kxk conv whose implanted
filters are zero except at the centre tap (:meth:`ImplantConv2d.dense_weight`, built once
and cached while gradients are off); it skips the second conv and the concatenation but
executes ``implanted*C_in*(kh*kw - 1)`` zero MACs per output position. ``"auto"`` picks
dense when those zero MACs are at most ``DENSE_BREAK_EVEN`` times the elements the split
path additionally moves per position (``C_in + 2*C_out``: the implant re-reads the input,
the concatenation writes and re-reads the output). Measured on a 1-thread AMD EPYC with
oneDNN (batch 64 or 8, 16 to 256 channels, CPU time): dense is as fast as the kept filters
alone for CIFAR-sized layers (16 -> 16 on 32x32 with 3 implants: 1.8 ms vs 2.9 ms split),
and split wins for wide layers with many implants (128 -> 128 with 32 implants: 2.0 vs 2.3).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.layers.spec import register_layer

__all__ = ["ImplantConv2d", "DENSE_BREAK_EVEN"]

# Zero MACs the dense path may execute per element the split path would additionally move
# (see the module docstring; fitted on measured break-even points between 43 and 69).
DENSE_BREAK_EVEN = 56
_EXECUTIONS = ("auto", "dense", "split")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _centre_offsets(kernel: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """Per side: padding of a 1x1 conv that reads the kxk window's centre tap (may be < 0)."""
    if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        raise ValueError(f"Neural Implant needs odd kernel sides, got {kernel}")
    return (padding[0] - dilation[0] * (kernel[0] - 1) // 2, padding[1] - dilation[1] * (kernel[1] - 1) // 2)


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-D tensor (e.g. after ``model.to(memory_format=...)``)."""
    nhwc = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def _runs(order: Sequence[int], kept: int) -> tuple[tuple[int, int, int], ...]:
    """``(part, start, stop)`` slices of ``[conv output, implant output]`` whose concatenation
    is the re-ordered output: maximal runs of consecutive channels from one part."""
    runs: list[list[int]] = []
    for position in order:
        part, index = (0, position) if position < kept else (1, position - kept)
        if runs and runs[-1][0] == part and runs[-1][2] == index:
            runs[-1][2] += 1
        else:
            runs.append([part, index, index + 1])
    return tuple((p, a, b) for p, a, b in runs)


@register_layer
class ImplantConv2d(nn.Module):
    """A kxk conv with ``kept_channels`` filters plus ``implant_channels`` zero-initialised 1x1
    filters over all ``in_channels`` inputs (HAP Neural Implant); see the module docstring.

    ``channel_order`` (length ``kept + implanted``, a permutation) places the concatenated
    outputs; ``None`` keeps ``[kept..., implanted...]``. Only ``groups=1`` convs are implanted.
    ``execution`` (not part of the spec) chooses how the output is computed.
    """

    def __init__(
        self,
        in_channels: int,
        kept_channels: int,
        implant_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        channel_order: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        kernel, stride, padding, dilation = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
        if kept_channels < 1 or implant_channels < 1:
            raise ValueError("ImplantConv2d needs at least one kept and one implanted channel")
        offsets = _centre_offsets(kernel, padding, dilation)
        self.conv = nn.Conv2d(in_channels, kept_channels, kernel, stride, padding, dilation, bias=bias,
                              padding_mode=padding_mode)
        self.implant = nn.Conv2d(in_channels, implant_channels, 1, stride, tuple(max(o, 0) for o in offsets),
                                 bias=bias, padding_mode=padding_mode)
        nn.init.zeros_(self.implant.weight)
        if self.implant.bias is not None:
            nn.init.zeros_(self.implant.bias)
        self._crop = tuple(max(-o, 0) for o in offsets)
        self._execution = "auto"
        self._cache: tuple[list[Tensor], list[int], Tensor, Tensor | None] | None = None
        self.set_channel_order(channel_order)

    def set_channel_order(self, channel_order: Sequence[int] | None) -> None:
        """Set the output permutation (see the class docstring); identity orders are dropped."""
        total = self.conv.out_channels + self.implant.out_channels
        order = None if channel_order is None else [int(c) for c in channel_order]
        if order is not None and sorted(order) != list(range(total)):
            raise ValueError(f"channel_order must be a permutation of 0..{total - 1}")
        if order == list(range(total)):
            order = None
        self.channel_order = order
        self._runs = _runs(order, self.conv.out_channels) if order is not None else ()
        self._cache = None
        index = torch.tensor(order if order is not None else [], dtype=torch.long)
        self.register_buffer("_order", index.to(self.conv.weight.device), persistent=False)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in _EXECUTIONS:
            raise ValueError(f"execution must be one of {_EXECUTIONS}, got {value!r}")
        self._execution = value

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels + self.implant.out_channels

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    def runs_dense(self) -> bool:
        """Whether :meth:`forward` runs the single dense kxk conv (see the module docstring)."""
        if self._execution != "auto":
            return self._execution == "dense"
        kh, kw = self.conv.kernel_size
        zero_macs = self.implant.out_channels * self.in_channels * (kh * kw - 1)
        return zero_macs <= DENSE_BREAK_EVEN * (self.in_channels + 2 * self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.runs_dense():
            weight, bias = self._dense_params()
            return self.conv._conv_forward(x, weight, bias)
        parts = (self.conv(x), self.implant(self._crop_input(x)))
        if self.channel_order is None:
            return torch.cat(parts, dim=1)
        return torch.cat([parts[p][:, a:b] for p, a, b in self._runs], dim=1)

    def centre_inputs(self, x: Tensor) -> Tensor:
        """What the 1x1 implant multiplies: every input channel at the centre tap of each output
        position, ``[N, in_channels, H_out, W_out]`` (the implant's output is ``implant.weight``
        applied to this per position, plus its bias)."""
        eye = torch.eye(self.in_channels, dtype=x.dtype, device=x.device).view(self.in_channels, -1, 1, 1)
        return self.implant._conv_forward(self._crop_input(x), eye, None)

    def _crop_input(self, x: Tensor) -> Tensor:
        """The input as the 1x1 implant reads it (cropped where the kxk padding is too small)."""
        ch, cw = self._crop
        return x[:, :, ch : x.shape[2] - ch, cw : x.shape[3] - cw] if (ch or cw) else x

    def _dense_params(self) -> tuple[Tensor, Tensor | None]:
        """:meth:`dense_weight`, cached while gradients are off and the parameters are the same
        storage at the same in-place version (the cache holds views, so no other tensor can
        take their memory while it lives)."""
        params = [p for p in (self.conv.weight, self.conv.bias, self.implant.weight, self.implant.bias)
                  if p is not None]
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if tracing or torch.is_grad_enabled() or any(p.is_inference() for p in params):
            return self.dense_weight()
        if self._cache is not None:
            views, versions, weight, bias = self._cache
            if len(views) == len(params) and all(
                    p.data_ptr() == v.data_ptr() and p._version == n and p.shape == v.shape and p.stride() == v.stride()
                    for p, v, n in zip(params, views, versions)):
                return weight, bias
        weight, bias = self.dense_weight()
        self._cache = ([p.detach() for p in params], [p._version for p in params], weight, bias)
        return weight, bias

    def dense_weight(self) -> tuple[Tensor, Tensor | None]:
        """The equivalent plain kxk conv: weight ``[out, in, kh, kw]`` with each implant filter at
        the centre tap, and bias, both in output order and in ``self.conv.weight``'s memory
        format. ``self.conv``'s stride, padding and dilation apply. Differentiable."""
        kh, kw = self.conv.kernel_size
        centre = F.pad(self.implant.weight, (kw // 2, kw // 2, kh // 2, kh // 2))
        weight = torch.cat([self.conv.weight, centre])
        bias = None if self.conv.bias is None else torch.cat([self.conv.bias, self.implant.bias])
        if self.channel_order is not None:
            weight = weight.index_select(0, self._order)
            bias = None if bias is None else bias.index_select(0, self._order)
        return weight.contiguous(memory_format=_memory_format(self.conv.weight)), bias

    def count_macs(self, input: Tensor, output: Tensor) -> int:
        """Exact multiply-accumulates of one call (whole batch): kxk filters plus 1x1 filters."""
        per_position = output.shape[0] * output.shape[2] * output.shape[3]
        kh, kw = self.conv.kernel_size
        kept = self.conv.out_channels * self.conv.in_channels * kh * kw
        return per_position * (kept + self.implant.out_channels * self.implant.in_channels)

    def spec_kwargs(self) -> dict[str, Any]:
        c = self.conv
        return {
            "in_channels": c.in_channels,
            "kept_channels": c.out_channels,
            "implant_channels": self.implant.out_channels,
            "kernel_size": list(c.kernel_size),
            "stride": list(c.stride),
            "padding": list(c.padding),
            "dilation": list(c.dilation),
            "bias": c.bias is not None,
            "padding_mode": c.padding_mode,
            "channel_order": self.channel_order,
        }

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, implanted: Sequence[int]) -> "ImplantConv2d":
        """Implant output channels ``implanted`` of ``conv``: the other filters are copied, the
        implanted ones become zero 1x1 filters (their bias entries are kept); channel order and
        count are unchanged, so ``conv``'s consumers need no change."""
        implanted = sorted({int(c) for c in implanted})
        if conv.groups != 1 or isinstance(conv.padding, str):
            raise ValueError("Neural Implant supports plain convs (groups=1, numeric padding)")
        kept = [c for c in range(conv.out_channels) if c not in set(implanted)]
        layer = cls(conv.in_channels, len(kept), len(implanted), conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, conv.padding_mode)
        position = {c: i for i, c in enumerate(kept + implanted)}
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        layer.set_channel_order([position[c] for c in range(conv.out_channels)])
        with torch.no_grad():
            layer.conv.weight.copy_(conv.weight[kept])
            if conv.bias is not None:
                layer.conv.bias.copy_(conv.bias[kept])
                layer.implant.bias.copy_(conv.bias[implanted])
        return layer

    def extra_repr(self) -> str:
        return (f"kept={self.conv.out_channels}, implanted={self.implant.out_channels}, "
                f"reordered={self.channel_order is not None}, execution={self._execution}")
