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

Fast path (``impl="kernel"``, stride 1 or 2, padding <= 2): rows with ``i = a (mod P)`` share
one support, so the compiled kernels (``_kernels/``) tile 4 such filters x 4 pixel vectors in
registers and run only the nonzero MACs, forward and backward. Stride 2 runs as a stride-1
2x2 conv of the input's four phase planes (polyphase split, ``_kernels/plan.py``).
``impl="reference"`` is the dense conv with the scattered weight; it serves ONNX export,
non-CPU tensors and stride > 2, and caches the scattered weight while no gradient can reach
``weight_nz`` and it is unchanged (``DenseWeightCache``; saved 6-9 of 35-43 us per call for
16 -> 16 on 8x8, batch 1). ``impl="auto"`` runs the kernels at stride 1 and the reference at
stride 2. Measured stride-2 speed, reference time / polyphase time (64 -> 128, 16x16 and 32x32
inputs, batch 1 and 64, inference and training, one thread): ``psd4_p8`` 0.55-0.99,
``ps4_p4`` 0.47-1.01, ``psd2_p8`` 0.59-0.86 on 16x16 and 1.09-1.22 on 32x32, ``psd1_p16``
0.81-1.22 on 16x16 and 1.44-1.57 on 32x32. The split itself is a gather of the whole input.

``impl="grouped"`` runs the layer as a sum of dense grouped convs, one per position set of the
pattern (:mod:`leanconv.layers.periodic_grouped`; channel counts must be multiples of the
period): the form a runtime without sparse kernels can run fast, and what an ONNX export
writes for such a layer. An export or trace writes the reference form for ``"kernel"`` and
``"auto"`` (the same function). Which form is fastest depends on the runtime and the layer's
shape; ``leanconv.convs.placement`` measures it and sets ``impl``, which is saved with the
layer when it is not ``"auto"``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.layers._kernels import SparseConvPlan, in_layout_of, kernels_usable, sparse_conv
from leanconv.layers._kernels.sparse_conv import writing_graph
from leanconv.layers._kernels.plan import TapPattern
from leanconv.layers._kernels.sparse_conv import DenseWeightCache
from leanconv.layers.periodic_grouped import GroupedForm, grouped_conv, grouped_form, grouped_weights
from leanconv.layers.spec import register_layer

__all__ = ["support_size", "PeriodicSparseConv2d", "PATTERNS", "pattern_mask", "has_grouped_form"]

_TL, _TR, _BL, _BR = (0, 1, 3, 4), (1, 2, 4, 5), (3, 4, 6, 7), (4, 5, 7, 8)
_DENSE = tuple(range(9))

# name -> period P and the positions kept by pattern t = 0..P-1
PATTERNS: dict[str, tuple[tuple[int, ...], ...]] = {
    "psd4_p8": (_DENSE, _TL, _TR, _BL, _BR, _TL, _TR, _BL),
    "psd2_p8": (_DENSE, (0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8), (0, 1)),
    "psd1_p16": (_DENSE, *(((t - 1) % 9,) for t in range(1, 16))),
    "ps4_p4": (_BR, _TL, _TR, _BL),
}
IMPLS = ("auto", "kernel", "reference", "grouped")
# strides the compiled kernels run for each impl; auto leaves stride 2 to the reference,
# which was faster for the default pattern (module docstring)
KERNEL_STRIDES = {"auto": (1,), "kernel": (1, 2), "reference": ()}


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


def has_grouped_form(in_channels: int, out_channels: int, pattern: str) -> bool:
    """Whether ``impl="grouped"`` can run these channels with ``pattern`` (multiples of its period)."""
    period = len(PATTERNS[pattern])
    return in_channels % period == 0 and out_channels % period == 0


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
        impl: ``"auto"`` (default), ``"kernel"``, ``"reference"`` or ``"grouped"`` (module
            docstring). Saved with the layer when not ``"auto"``.
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
        if impl == "grouped" and not has_grouped_form(in_channels, out_channels, pattern):
            raise LeanconvError(f"PeriodicSparseConv2d: impl='grouped' needs channel counts that are multiples of "
                                f"the pattern's period {len(PATTERNS[pattern])}, got {in_channels} -> {out_channels}")
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
        self._plan: tuple[tuple[int, int], SparseConvPlan] | None = None  # keyed by (stride, padding)
        self._dense_cache = DenseWeightCache()
        self._grouped: GroupedForm | None = None

    def spec_kwargs(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": 3,
                "stride": self.stride, "padding": self.padding, "pattern": self.pattern,
                "bias": self.bias is not None, **({"impl": self.impl} if self.impl != "auto" else {})}

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
        if self.impl == "grouped" and not (x.is_meta or self.weight_nz.is_meta):  # a dry run takes the reference
            if self._grouped is None:
                self._grouped = grouped_form(self.out_channels, self.in_channels, PATTERNS[self.pattern],
                                             self.nz_index.cpu())
            weights = self._dense_cache.get(self.weight_nz, lambda: grouped_weights(self.weight_nz, self._grouped))
            y = grouped_conv(x, weights, self._grouped, self.stride, self.padding)
            return y if self.bias is None else y + self.bias[:, None, None]
        if self._use_kernel(x):
            y = in_layout_of(x, sparse_conv(x, self.weight_nz, self._kernel_plan()))
            return y if self.bias is None else y + self.bias[:, None, None]
        weight = self._dense_cache.get(self.weight_nz, self.dense_weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.impl in ("reference", "grouped") or (self.impl == "kernel" and (writing_graph() or x.is_meta)):
            return False  # an exported or traced graph holds the reference form: the same function
        usable = (self.stride in KERNEL_STRIDES[self.impl] and self.padding <= 2
                  and kernels_usable(x, self.weight_nz)  # first: shapes are tensors while tracing
                  and not (x.dim() == 4 and min(x.shape[2:]) + 2 * self.padding < 3))  # the reference raises
        if self.impl == "kernel" and not usable:
            raise LeanconvError("PeriodicSparseConv2d: impl='kernel' needs stride 1 or 2, padding <= 2, an input "
                                "no smaller than the kernel and CPU float32/64 tensors outside export or "
                                "tracing; use impl='auto'")
        return usable

    def _kernel_plan(self) -> SparseConvPlan:
        key = (self.stride, self.padding)
        if self._plan is None or self._plan[0] != key:
            flat = self.nz_index.cpu().numpy()
            row, rest = np.divmod(flat, self.in_channels * 9)
            col, pos = np.divmod(rest, 9)
            dy, dx = np.divmod(pos, 3)
            taps = TapPattern(row, col, dy, dx, np.arange(flat.size), self.out_channels, self.in_channels, 3)
            self._plan = (key, SparseConvPlan(taps, self.padding, self._reference, stride=self.stride))
        return self._plan[1]

    def _reference(self, x: torch.Tensor, weight_nz: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._scatter(weight_nz), None, self.stride, self.padding)
