"""Pre-defined periodic sparse 3x3 convolution (pSConv).

Papers: Kundu et al., "Pre-defined Sparsity for Low-Complexity Convolutional Neural
Networks", IEEE Trans. Computers 2020, and the Allerton 2019 version (code:
ksouvik52/Pre-defined-sparseCNN).

Kernel ``W[i, j]`` (output filter ``i``, input channel ``j``) keeps only the positions of
pattern ``t = (i + j + 1) mod P`` of a named set; positions are 0..8 row-major in the 3x3
window. The support is fixed before training and only the nonzeros are parameters
(``weight_nz``, in ``(i, j, position)`` order), so the zeros stay exactly zero under any
optimiser, momentum and weight decay, and the state dict stores only the nonzeros.

Pattern sets (``PATTERNS``; ``d`` = one dense kernel per period at ``t = 0``):

- ``psd4_p8`` (paper's pSC4, P=8): t=1,5 top-left 2x2 {0,1,3,4}; t=2,6 top-right {1,2,4,5};
  t=3,7 bottom-left {3,4,6,7}; t=4 bottom-right {4,5,7,8}; t=0 dense. Density 51.4%.
- ``psd2_p8`` (pSC2, P=8): t=1..7 -> {0,1},{1,2},{3,4},{4,5},{6,7},{7,8},{0,1}; t=0 dense.
- ``psd1_p16`` (P=16): one nonzero per sparse kernel, at position ``(t - 1) mod 9`` for
  t=1..15 (cycling through all nine positions: our reading); t=0 dense. Density 16.7%.
- ``ps4_p4`` (P=4, no dense kernel): the four 2x2 boxes cycle with ``t``; ``t`` uses the box
  of ``psd4_p8``'s ``t`` (1 top-left, 2 top-right, 3 bottom-left, 0 bottom-right: our
  reading, no source fixes it). Density 44.4%.

MACs per call: ``nnz(W) * H_out * W_out * N`` (:meth:`PeriodicSparseConv2d.count_macs`).

Fast path (``impl="kernel"``, stride 1): rows with ``i = a (mod P)`` share one support, so
the compiled kernels (``_kernels/``) tile 4 such filters x 4 pixel vectors in registers and
run only the nonzero MACs, forward and backward. ``impl="reference"`` is the dense conv with
the scattered weight; it also serves stride 2, ONNX export and non-CPU tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.layers._kernels import SparseConvPlan, kernels_usable, sparse_conv
from leanconv.layers._kernels.plan import TapPattern
from leanconv.layers.spec import register_layer

__all__ = ["support_size", "PeriodicSparseConv2d", "PATTERNS", "pattern_mask"]

_TL, _TR, _BL, _BR = (0, 1, 3, 4), (1, 2, 4, 5), (3, 4, 6, 7), (4, 5, 7, 8)
_DENSE = tuple(range(9))

# name -> period P and the positions kept by pattern t = 0..P-1
PATTERNS: dict[str, tuple[tuple[int, ...], ...]] = {
    "psd4_p8": (_DENSE, _TL, _TR, _BL, _BR, _TL, _TR, _BL),
    "psd2_p8": (_DENSE, (0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8), (0, 1)),
    "psd1_p16": (_DENSE, *(((t - 1) % 9,) for t in range(1, 16))),
    "ps4_p4": (_BR, _TL, _TR, _BL),
}
IMPLS = ("auto", "kernel", "reference")


def pattern_mask(out_channels: int, in_channels: int, pattern: str) -> torch.Tensor:
    """The ``[out, in, 3, 3]`` boolean support of ``pattern``."""
    if pattern not in PATTERNS:
        raise LeanconvError(f"unknown pSConv pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    table = PATTERNS[pattern]
    period = len(table)
    by_t = torch.zeros(period, 9, dtype=torch.bool)
    for t, positions in enumerate(table):
        by_t[t, list(positions)] = True
    t = (torch.arange(out_channels)[:, None] + torch.arange(in_channels)[None, :] + 1) % period
    return by_t[t].view(out_channels, in_channels, 3, 3)


def support_size(out_channels: int, in_channels: int, pattern: str) -> int:
    """Nonzero weights of the ``[out, in, 3, 3]`` support of ``pattern`` (``pattern_mask(...).sum()``),
    counted without building the mask: pair (o, i) uses table entry ``(o + i + 1) mod P``."""
    table = PATTERNS[pattern]
    period = len(table)

    def residues(n: int) -> list[int]:  # how many of 0..n-1 leave each remainder mod P
        return [n // period + (1 if r < n % period else 0) for r in range(period)]

    outs, ins = residues(out_channels), residues(in_channels)
    return sum(outs[a] * ins[b] * len(table[(a + b + 1) % period]) for a in range(period) for b in range(period))


def _pair_one(name: str, value) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise LeanconvError(f"PeriodicSparseConv2d: {name} must be one integer (square), got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise LeanconvError(f"PeriodicSparseConv2d: {name} must be an integer, got {value!r}")
    return value


@register_layer
class PeriodicSparseConv2d(nn.Module):
    """3x3 convolution with a pre-defined periodic sparse support (pSConv).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: must be 3 (the patterns are 3x3).
        stride, padding: as in ``nn.Conv2d`` (square).
        pattern: a key of :data:`PATTERNS`.
        bias: add a learnt per-channel bias (default False).
        impl: ``"auto"`` (default), ``"kernel"`` or ``"reference"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1,
                 pattern: str = "psd4_p8", bias: bool = False, impl: str = "auto"):
        super().__init__()
        kernel_size, stride, padding = (_pair_one(n, v) for n, v in
                                        (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)))
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LeanconvError(f"PeriodicSparseConv2d: {name} must be a positive integer, got {value!r}")
        if kernel_size != 3:
            raise LeanconvError(f"PeriodicSparseConv2d: kernel_size must be 3 (patterns are 3x3), got {kernel_size}")
        if stride < 1 or padding < 0:
            raise LeanconvError(f"PeriodicSparseConv2d: need stride >= 1 and padding >= 0, got {stride}, {padding}")
        if impl not in IMPLS:
            raise LeanconvError(f"PeriodicSparseConv2d: impl={impl!r} is unknown; use one of {', '.join(IMPLS)}")
        mask = pattern_mask(out_channels, in_channels, pattern)
        self.in_channels, self.out_channels, self.pattern = in_channels, out_channels, pattern
        self.kernel_size, self.stride, self.padding, self.impl = 3, stride, padding, impl
        self.period = len(PATTERNS[pattern])
        if mask.is_meta:  # a dry run (leanconv.util.meta_build): nonzero() needs values; the count does not
            nz_index = torch.empty(support_size(out_channels, in_channels, pattern), dtype=torch.int64)
        else:
            nz_index = mask.reshape(-1).nonzero().squeeze(1)
        self.register_buffer("nz_index", nz_index, persistent=False)  # flat index into [out, in, 3, 3]
        self.weight_nz = nn.Parameter(torch.empty(nz_index.numel()))
        bound = 1 / math.sqrt(nz_index.numel() / out_channels)  # Conv2d's bound, fan-in = nonzeros per filter
        nn.init.uniform_(self.weight_nz, -bound, bound)
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound)) if bias else None
        self._plan: SparseConvPlan | None = None

    def spec_kwargs(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": 3,
                "stride": self.stride, "padding": self.padding, "pattern": self.pattern,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=3, stride={self.stride}, "
                f"padding={self.padding}, pattern={self.pattern!r}, bias={self.bias is not None}, impl={self.impl!r}")

    @property
    def density(self) -> float:
        """Fraction of the dense 3x3 weight that is kept."""
        return self.weight_nz.numel() / (self.out_channels * self.in_channels * 9)

    def dense_weight(self) -> torch.Tensor:
        """The masked dense ``[out, in, 3, 3]`` weight (differentiable; zeros off the support)."""
        return self._scatter(self.weight_nz)

    def _scatter(self, weight_nz: torch.Tensor) -> torch.Tensor:
        flat = weight_nz.new_zeros(self.out_channels * self.in_channels * 9)
        return flat.scatter(0, self.nz_index, weight_nz).view(self.out_channels, self.in_channels, 3, 3)

    def count_macs(self, input: torch.Tensor, output: torch.Tensor) -> int:
        """Nonzero multiply-adds of this call: ``nnz(W) * H_out * W_out * N`` (bias adds not counted)."""
        return int(output.numel() // self.out_channels) * self.weight_nz.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            y = sparse_conv(x, self.weight_nz, self._kernel_plan())
            return y if self.bias is None else y + self.bias[:, None, None]
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.impl == "reference":
            return False
        applicable = self.stride == 1 and self.padding <= 2
        usable = applicable and kernels_usable(x, self.weight_nz)
        if self.impl == "kernel" and not usable:
            raise LeanconvError("PeriodicSparseConv2d: impl='kernel' needs stride 1, padding <= 2 and CPU "
                                "float32/64 tensors outside export or tracing; use impl='auto'")
        return usable

    def _kernel_plan(self) -> SparseConvPlan:
        if self._plan is None:
            flat = self.nz_index.cpu().numpy()
            row, rest = np.divmod(flat, self.in_channels * 9)
            col, pos = np.divmod(rest, 9)
            dy, dx = np.divmod(pos, 3)
            taps = TapPattern(row, col, dy, dx, np.arange(flat.size), self.out_channels, self.in_channels, 3)
            self._plan = SparseConvPlan(taps, self.padding, self._reference_stride1)
        return self._plan

    def _reference_stride1(self, x: torch.Tensor, weight_nz: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._scatter(weight_nz), None, 1, self.padding)
