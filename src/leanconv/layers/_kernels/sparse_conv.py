"""Autograd wrapper of the class-blocked sparse convolution kernels (square kernel, stride 1 or 2).

:class:`SparseConvPlan` holds everything fixed for one layer's structure: the tap pattern,
its class plan and the transposed plan for the input gradient. :func:`sparse_conv` runs the
forward kernel; its backward runs the same kernel on the transposed plan (input gradient)
and the weight-gradient kernel, so training also executes only the nonzero multiply-adds.
Stride 2 runs as a stride-1 convolution of the input's four phase planes
(:class:`~leanconv.layers._kernels.plan.PhaseGrid`): the input is gathered straight into
the kernel's buffer and the input gradient gathered back. Double backward
(``create_graph=True``) recomputes through the layer's differentiable reference formula
instead, so Hessian-vector products stay exact.

:class:`DenseWeightCache` keeps a layer's scattered dense weight for its reference (dense
conv) path between calls while no gradient can reach the parameter and the parameter's
storage and in-place version are unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch

from leanconv.errors import LeanconvError
from leanconv.layers._kernels.loader import kernel_library
from leanconv.layers._kernels.plan import ClassPlan, Grid, PhaseGrid, TapPattern

__all__ = ["in_layout_of", "writing_graph", "SparseConvPlan", "sparse_conv", "kernels_usable", "DenseWeightCache"]

Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WGRAD_VECTORS = 64  # (sample, vector) pairs per weight-gradient tile: amortises the final sums


class SparseConvPlan:
    """Fixed structure of one sparse conv: ``y = conv(x, W, stride=stride, padding=pad)``
    where ``W`` has the taps of ``taps`` and the values of a flat parameter. ``reference``
    computes the same function differentiably (used for double backward)."""

    def __init__(self, taps: TapPattern, pad: int, reference: Reference, stride: int = 1):
        if not 0 <= pad <= taps.kernel - 1:
            raise ValueError(f"padding {pad} outside [0, kernel - 1] is not supported by the kernels")
        if stride not in (1, 2) or (stride == 2 and taps.kernel % 2 == 0):
            raise ValueError(f"the kernels run stride 1, or stride 2 with an odd kernel; got stride {stride}, "
                             f"kernel {taps.kernel}")
        self.taps, self.pad, self.stride, self.reference = taps, pad, stride, reference
        run = taps.polyphase() if stride == 2 else taps
        self.forward_plan = ClassPlan(run)
        self.backward_plan = ClassPlan(run.transposed())
        self._grids: dict[tuple[int, int, int], tuple[Grid, Grid]] = {}

    def grids(self, h: int, w: int, lanes: int) -> tuple[Grid, Grid]:
        """The forward grid of an ``h x w`` input and the input-gradient grid (cached)."""
        key = (h, w, lanes)
        if key not in self._grids:
            k = self.taps.kernel
            if self.stride == 2:
                fwd = PhaseGrid.build(h, w, k, self.pad, lanes)
                self._grids[key] = (fwd, fwd.back)
            else:
                fwd = Grid.build(h, w, k, self.pad, lanes)
                self._grids[key] = (fwd, Grid.build(fwd.h_out, fwd.w_out, k, k - 1 - self.pad, lanes))
        return self._grids[key]


def writing_graph() -> bool:
    """True under ONNX export, tracing or compilation: a graph is being recorded, so only
    standard operations may run (never the compiled kernels, never a cached weight)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()


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
    if writing_graph():
        return False
    return kernel_library(first.dtype) is not None


def _run(plan: ClassPlan, grid: Grid, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One kernel call on ``x`` (``[N, C, h, w]`` as ``grid`` reads it); returns the raw output
    buffer ``[N, plan.rows, grid.out_len]`` (``grid.output_view`` gives the image)."""
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
    return out


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
        grid, back = plan.grids(x.shape[2], x.shape[3], kernel_library(x.dtype).lanes)
        y = grid.output_view(_run(plan.forward_plan, grid, x, weight))
        ctx.plan, ctx.grid, ctx.back = plan, grid, back
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
            buf = _run(plan.backward_plan, ctx.back, gy, weight)
            gx = ctx.grid.input_grad(buf) if plan.stride == 2 else ctx.back.output_view(buf)
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


def in_layout_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (the kernels' contiguous NCHW output) in ``x``'s memory format: channels_last when
    ``x`` is, so that a model running in channels_last (as leanconv times eager PyTorch) does
    not convert the layout at the next layer."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, plan: SparseConvPlan) -> torch.Tensor:
    """``conv2d(x, dense(weight), stride=plan.stride, padding=plan.pad)`` through the compiled kernels.

    Call only when :func:`kernels_usable` says so. ``weight`` is the layer's flat parameter of
    nonzeros; the result is contiguous NCHW. The input's shape is checked here, because the
    compiled kernels index it without bounds checks.
    """
    if x.dim() != 4 or x.shape[1] != plan.taps.cols:
        raise LeanconvError(f"sparse conv expects input [N, {plan.taps.cols}, H, W], got {list(x.shape)}")
    if min(x.shape[2:]) + 2 * plan.pad < plan.taps.kernel:
        raise LeanconvError(f"sparse conv: input {list(x.shape)} is smaller than the {plan.taps.kernel}x"
                            f"{plan.taps.kernel} kernel with padding {plan.pad}")
    return _SparseConvFunction.apply(x, weight, plan)


class DenseWeightCache:
    """A dense weight built from one parameter, reused while it is provably unchanged.

    :meth:`get` returns ``build()`` and keeps it when no gradient can reach the parameter
    (grad mode off, or the parameter does not require grad); it returns the kept tensor while
    the parameter is the same storage, offset, shape, dtype and device at the same in-place
    version (``_version``, bumped by ``add_``, ``copy_``, optimiser steps and
    ``load_state_dict``). The entry holds a view of the parameter, so its memory cannot be
    reused by another tensor while cached. Writes that bypass the version counter
    (``param.data.add_(...)``, a NumPy view) are not seen; call :meth:`clear` after those.
    Never cached: under ONNX export, tracing, compilation or torch.func transforms, for
    inference tensors (they have no version) and for tensor subclasses. A plain attribute,
    not a buffer: it is not in the state dict, and copies and pickles start empty.
    """

    def __init__(self):
        self._entry: tuple | None = None

    def __getstate__(self) -> dict:
        return {"_entry": None}

    def clear(self) -> None:
        self._entry = None

    def get(self, param: torch.Tensor, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not _cacheable(param):
            return build()
        key = (param.data_ptr(), param.storage_offset(), param.shape, param.stride(), param.dtype,
               param.device, param._version, torch.is_inference_mode_enabled())
        entry = self._entry  # one read: another thread may replace it
        if entry is not None and entry[1] == key:
            return entry[2]
        weight = build()
        self._entry = (param.detach(), key, weight.detach())
        return weight


def _cacheable(param: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and param.requires_grad:
        return False
    if type(param) not in (torch.Tensor, torch.nn.Parameter) or param.is_inference() or param.is_meta:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(param):
        return False
    return not writing_graph()
