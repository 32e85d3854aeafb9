"""Autograd wrapper of the class-blocked sparse convolution kernels (stride 1, square kernel).

:class:`SparseConvPlan` holds everything fixed for one layer's structure: the tap pattern,
its class plan and the transposed plan for the input gradient. :func:`sparse_conv` runs the
forward kernel; its backward runs the same kernel on the transposed plan (input gradient)
and the weight-gradient kernel, so training also executes only the nonzero multiply-adds.
Double backward (``create_graph=True``) recomputes through the layer's differentiable
reference formula instead, so Hessian-vector products stay exact.
"""

from __future__ import annotations

from typing import Callable

import torch

from leanconv.errors import LeanconvError
from leanconv.layers._kernels.loader import kernel_library
from leanconv.layers._kernels.plan import ClassPlan, Grid, TapPattern

__all__ = ["SparseConvPlan", "sparse_conv", "kernels_usable"]

Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WGRAD_VECTORS = 64  # (sample, vector) pairs per weight-gradient tile: amortises the final sums


class SparseConvPlan:
    """Fixed structure of one sparse conv: ``y = conv(x, W, padding=pad)`` where ``W`` has the
    taps of ``taps`` and the values of a flat parameter."""

    def __init__(self, taps: TapPattern, pad: int, reference: Reference):
        if not 0 <= pad <= taps.kernel - 1:
            raise ValueError(f"padding {pad} outside [0, kernel - 1] is not supported by the kernels")
        self.taps, self.pad, self.reference = taps, pad, reference
        self.forward_plan = ClassPlan(taps)
        self.backward_plan = ClassPlan(taps.transposed())
        self._grids: dict[tuple[int, int, int, int], Grid] = {}

    def grid(self, h: int, w: int, pad: int, lanes: int) -> Grid:
        key = (h, w, pad, lanes)
        if key not in self._grids:
            self._grids[key] = Grid.build(h, w, self.taps.kernel, pad, lanes)
        return self._grids[key]


def kernels_usable(*tensors: torch.Tensor) -> bool:
    """True when the compiled kernels may run on these tensors right now: plain CPU tensors
    of one float type, not under export, tracing, compilation or torch.func transforms."""
    first = tensors[0]
    if first.dtype not in (torch.float32, torch.float64):
        return False
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.dtype != first.dtype:
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return kernel_library(first.dtype) is not None


def _run(plan: ClassPlan, grid: Grid, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One forward kernel call: ``x`` is ``[N, plan.cols, h, w]``; returns ``[N, plan.rows, h', w']``."""
    lib = kernel_library(x.dtype)
    xb = grid.input_buffer(x)
    n = x.shape[0]
    taps, rows = plan.offsets(grid.in_plane, grid.pitch, grid.out_len)
    wp = weight.detach().reshape(-1)[plan.pack_index].contiguous()
    out = (x.new_empty if plan.covers_all_rows else x.new_zeros)(n, plan.rows, grid.out_len)
    lib.forward(xb.data_ptr(), out.data_ptr(), n, plan.cols * grid.in_plane, plan.rows * grid.out_len,
                plan.n_classes, plan.member_ptr.data_ptr(), rows.data_ptr(), plan.tap_ptr.data_ptr(),
                taps.data_ptr(), wp.data_ptr(), plan.weight_offset.data_ptr(), grid.nvec,
                grid.ib.data_ptr(), grid.ob.data_ptr(), torch.get_num_threads())
    return grid.output_view(out)


def _weight_grad(plan: ClassPlan, grid: Grid, gy: torch.Tensor, xb: torch.Tensor, numel: int) -> torch.Tensor:
    """Gradient of the flat weight from the output gradient and the forward's input buffer."""
    lib = kernel_library(gy.dtype)
    a = grid.output_buffer(gy)
    n, nt = gy.shape[0], torch.get_num_threads()
    taps, rows = plan.offsets(grid.in_plane, grid.pitch, grid.out_len)
    nw = plan.pack_index.numel()
    packed = gy.new_zeros(nw)
    scratch = gy.new_zeros(nt, nw)
    chunk = max(1, WGRAD_VECTORS // grid.nvec)
    status = lib.weight_grad(a.data_ptr(), xb.data_ptr(), packed.data_ptr(), scratch.data_ptr(), nw, n,
                             plan.rows * grid.out_len, plan.cols * grid.in_plane, plan.n_classes,
                             plan.member_ptr.data_ptr(), rows.data_ptr(), plan.tap_ptr.data_ptr(),
                             taps.data_ptr(), plan.weight_offset.data_ptr(), grid.nvec, grid.ib.data_ptr(),
                             grid.ob.data_ptr(), chunk, nt)
    if status != 0:
        raise MemoryError("leanconv sparse conv kernel: out of memory in the weight gradient")
    return gy.new_zeros(numel).index_copy_(0, plan.pack_index, packed)


class _SparseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, plan: SparseConvPlan) -> torch.Tensor:
        lanes = kernel_library(x.dtype).lanes
        grid = plan.grid(x.shape[2], x.shape[3], plan.pad, lanes)
        y = _run(plan.forward_plan, grid, x, weight)
        ctx.plan, ctx.grid = plan, grid
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight = ctx.saved_tensors
        plan: SparseConvPlan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference formula
            return (*_reference_grads(plan, x, weight, gy, ctx.needs_input_grad), None)
        gy = gy.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            k = plan.taps.kernel
            back = plan.grid(gy.shape[2], gy.shape[3], k - 1 - plan.pad, kernel_library(gy.dtype).lanes)
            gx = _run(plan.backward_plan, back, gy, weight)
        if ctx.needs_input_grad[1]:
            xb = ctx.grid.input_buffer(x)
            gw = _weight_grad(plan.forward_plan, ctx.grid, gy, xb, weight.numel()).view_as(weight)
        return gx, gw, None


def _reference_grads(plan: SparseConvPlan, x, weight, gy, needs):
    wanted = [t for t, need in zip((x, weight), needs[:2]) if need]
    with torch.enable_grad():
        y = plan.reference(x, weight)
        grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True))
    return tuple(next(grads) if need else None for need in needs[:2])


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, plan: SparseConvPlan) -> torch.Tensor:
    """``conv2d(x, dense(weight), padding=plan.pad)`` through the compiled kernels (stride 1).

    Call only when :func:`kernels_usable` says so. ``weight`` is the layer's flat parameter of
    nonzeros; the result is contiguous NCHW. The input's shape is checked here, because the
    compiled kernels index it without bounds checks.
    """
    if x.dim() != 4 or x.shape[1] != plan.taps.cols:
        raise LeanconvError(f"sparse conv expects input [N, {plan.taps.cols}, H, W], got {list(x.shape)}")
    return _SparseConvFunction.apply(x, weight, plan)
