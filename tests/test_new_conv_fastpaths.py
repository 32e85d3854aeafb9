"""Fast paths of the structured-sparse layers: the stride-2 polyphase kernel of
PeriodicSparseConv2d against the dense reference (forward, backward, gradcheck, double
backward), and the dense-weight cache of both layers' reference paths (reused only while the
parameter is unchanged and no gradient can reach it; never in the state dict)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leanconv.errors import LeanconvError
from leanconv.layers import PATTERNS, PeriodicSparseConv2d, SlidingChannelConv2d
from leanconv.layers._kernels import kernels_available
from leanconv.layers._kernels.plan import PhaseGrid

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="no C compiler: compiled kernels unavailable")

# (in, out, batch, (H, W)): odd and even sides, batch 1 and 3, small and wider channel counts
CASES = [(5, 7, 1, (7, 9)), (5, 7, 3, (6, 5)), (16, 32, 3, (8, 8)), (16, 32, 1, (9, 10))]


def _reference(m: PeriodicSparseConv2d, x: torch.Tensor, weight_nz: torch.Tensor, bias) -> torch.Tensor:
    return F.conv2d(x, m._scatter(weight_nz), bias, m.stride, m.padding)


def _grads(m: PeriodicSparseConv2d, x: torch.Tensor, gy: torch.Tensor, reference: bool = False):
    """Output and gradients of input, weight_nz and bias, by the layer or by the reference formula."""
    x = x.detach().requires_grad_()
    y = _reference(m, x, m.weight_nz, m.bias) if reference else m(x)
    return (y, *torch.autograd.grad(y, (x, m.weight_nz, m.bias), gy))


@needs_kernels
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("c_in,c_out,batch,size", CASES)
def test_stride2_kernel_equals_reference_float64(pattern, padding, c_in, c_out, batch, size):
    m = PeriodicSparseConv2d(c_in, c_out, stride=2, padding=padding, pattern=pattern, bias=True,
                             impl="kernel").double()
    x = torch.randn(batch, c_in, *size, dtype=torch.float64)
    gy = torch.randn_like(_reference(m, x, m.weight_nz, m.bias))
    got, want = _grads(m, x, gy), _grads(m, x, gy, reference=True)
    assert got[0].shape == want[0].shape == (batch, c_out, (size[0] + 2 * padding - 3) // 2 + 1,
                                             (size[1] + 2 * padding - 3) // 2 + 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _rounding_bound(terms: int) -> float:
    """gamma_n = n u / (1 - n u), u = 2^-24: the float32 error of any sum of ``terms`` exact
    products, relative to the sum of their magnitudes, whatever the summation order."""
    nu = terms * 2.0 ** -24
    return nu / (1 - nu)


@needs_kernels
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("c_in,c_out,batch,size", [CASES[0], CASES[3]])
def test_stride2_kernel_float32_within_the_rounding_bound(pattern, padding, c_in, c_out, batch, size):
    """float32 results against the reference evaluated in float64 on the same float32 values
    (float32 products are exact in float64), allowing the order-independent worst-case rounding
    of each sum: ``gamma_n * (the same sum over magnitudes)``. Nothing here depends on this
    machine's vector width or oneDNN's blocking."""
    m = PeriodicSparseConv2d(c_in, c_out, stride=2, padding=padding, pattern=pattern, impl="kernel")
    x = torch.randn(batch, c_in, *size)
    gy = torch.randn_like(m(x))
    got = _grads_no_bias(m, x, gy)
    exact = _linear_grads(m, x.double(), m.weight_nz.detach().double(), gy.double())
    bound = _linear_grads(m, x.double().abs(), m.weight_nz.detach().double().abs(), gy.double().abs())
    h_out, w_out = gy.shape[2:]
    terms = (c_in * 9, c_out * 9, batch * h_out * w_out)  # per output, input gradient, weight gradient
    for name, g, e, b, n in zip(("output", "input grad", "weight grad"), got, exact, bound, terms):
        excess = (g.double() - e).abs() - _rounding_bound(n) * b
        assert excess.max() <= 0, f"{name}: off by {excess.max().item():.3g} beyond the rounding bound"


def _grads_no_bias(m, x, gy):
    x = x.detach().requires_grad_()
    y = m(x)
    return (y, *torch.autograd.grad(y, (x, m.weight_nz), gy))


def _linear_grads(m, x, weight_nz, gy):
    x, weight_nz = x.detach().requires_grad_(), weight_nz.detach().requires_grad_()
    y = _reference(m, x, weight_nz, None)
    return (y.detach(), *torch.autograd.grad(y, (x, weight_nz), gy))


@needs_kernels
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_stride2_gradcheck(pattern, padding):
    m = PeriodicSparseConv2d(3, 5, stride=2, padding=padding, pattern=pattern, impl="kernel").double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = m.weight_nz.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(m, {"weight_nz": w}, (x,)), (x, w))


@needs_kernels
@pytest.mark.parametrize("padding", [0, 1])
def test_stride2_double_backward_equals_reference(padding):
    """create_graph=True differentiates the reference formula: Hessian-vector style products
    through the kernel path equal those through the dense reference."""
    m = PeriodicSparseConv2d(6, 9, stride=2, padding=padding, pattern="psd4_p8", impl="kernel").double()
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    results = []
    for reference in (False, True):
        xr = x.clone().requires_grad_()
        y = _reference(m, xr, m.weight_nz, None) if reference else m(xr)
        loss = (y.square() * torch.linspace(0, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        gx, gw = torch.autograd.grad(loss, (xr, m.weight_nz), create_graph=True)
        second = torch.autograd.grad(gx.sin().sum() + gw.square().sum(), (xr, m.weight_nz))
        results.append((gx.detach(), gw.detach(), *second))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    w = m.weight_nz.detach().clone().requires_grad_()
    xs = torch.randn(1, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: torch.func.functional_call(m, {"weight_nz": w}, (x,)), (xs, w))


@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize("size", [(6, 8), (7, 5)])
def test_phase_buffer_is_pixel_unshuffle_of_the_padded_input(pad, size):
    """Channel 4c + 2a + b of the kernel's buffer holds pad(x)[c, 2u + a, 2v + b]; every other
    entry is zero, and the input-gradient gather is the adjoint of that placement."""
    h, w = size
    grid = PhaseGrid.build(h, w, 3, pad, 8)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    buf = grid.input_buffer(x)
    h_out, w_out = (h + 2 * pad - 3) // 2 + 1, (w + 2 * pad - 3) // 2 + 1
    hp, wp = 2 * (h_out + 1), 2 * (w_out + 1)
    assert (grid.h, grid.w, grid.h_out, grid.w_out) == (h_out + 1, w_out + 1, h_out, w_out)
    phases = F.pixel_unshuffle(F.pad(x, (pad, wp - w - pad, pad, hp - h - pad)), 2)
    torch.testing.assert_close(buf[:, :, : hp // 2, : wp // 2], phases, rtol=0, atol=0)
    rest = buf.clone()
    rest[:, :, : hp // 2, : wp // 2] = 0
    assert torch.count_nonzero(rest) == 0  # zeros outside the phase image
    g = torch.randn(2, 12, grid.back.out_len, dtype=torch.float64)
    image = grid.back.output_view(g)  # what the input-gradient kernel wrote: the phase image
    want = F.pixel_shuffle(image, 2)[:, :, pad : pad + h, pad : pad + w]
    torch.testing.assert_close(grid.input_grad(g), want, rtol=0, atol=0)


@needs_kernels
def test_stride2_auto_uses_the_reference_and_kernel_is_opt_in():
    """Measured slower than the dense reference for the default pattern, the polyphase kernel
    runs only with impl='kernel'; auto gives the reference's exact bits."""
    x = torch.randn(2, 16, 9, 9)
    auto = PeriodicSparseConv2d(16, 24, stride=2, pattern="psd4_p8")
    ref = PeriodicSparseConv2d(16, 24, stride=2, pattern="psd4_p8", impl="reference")
    ker = PeriodicSparseConv2d(16, 24, stride=2, pattern="psd4_p8", impl="kernel")
    for m in (ref, ker):
        m.load_state_dict(auto.state_dict())
    with torch.no_grad():
        assert torch.equal(auto(x), ref(x))
        torch.testing.assert_close(ker(x), ref(x), rtol=1e-4, atol=1e-4)
    assert not auto._use_kernel(x) and ker._use_kernel(x)


@pytest.mark.parametrize("kwargs,shape", [({"stride": 3}, (1, 4, 8, 8)), ({"stride": 2, "padding": 0}, (1, 4, 2, 5)),
                                          ({"stride": 1, "padding": 0}, (1, 4, 2, 2))])
def test_kernel_refuses_what_it_cannot_run(kwargs, shape):
    m = PeriodicSparseConv2d(4, 4, impl="kernel", **kwargs)
    with pytest.raises(LeanconvError):
        m(torch.randn(*shape))


def test_auto_sends_too_small_inputs_to_the_reference_error():
    """An input smaller than the kernel fails as nn.Conv2d fails (it once gave an empty output)."""
    for stride in (1, 2):
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            PeriodicSparseConv2d(4, 4, stride=stride, padding=0)(torch.randn(1, 4, 2, 2))


# ---- the dense-weight cache of the reference paths ----

LAYERS = {
    "psconv": (lambda: PeriodicSparseConv2d(16, 16, pattern="psd4_p8", bias=True, impl="reference"), "weight_nz"),
    "psconv_s2": (lambda: PeriodicSparseConv2d(16, 16, stride=2, pattern="psd2_p8"), "weight_nz"),
    "scc": (lambda: SlidingChannelConv2d(16, 16, groups=4, overlap=0.5, impl="reference"), "weight"),
}


def _uncached(m, x):
    """The reference formula with a freshly scattered weight."""
    if isinstance(m, PeriodicSparseConv2d):
        return F.conv2d(x, m.dense_weight(), m.bias, m.stride, m.padding)
    return F.conv2d(x, m.dense_weight(), stride=m.stride)


def _count_builds(m):
    calls = []
    build = m.dense_weight

    def counted():
        calls.append(1)
        return build()
    m.dense_weight = counted
    return calls


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_cache_reuses_the_weight_only_while_no_gradient_can_reach_it(layer):
    make, _ = LAYERS[layer]
    m, x = make(), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = _uncached(m, x)
    builds = _count_builds(m)
    with torch.no_grad():
        first, second = m(x), m(x)
    assert len(builds) == 1
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    y = m(x)  # grad mode, parameter requires grad: built anew, and gradients flow
    assert len(builds) == 2 and y.requires_grad
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_cache_follows_in_place_updates_state_dict_loads_and_dtype_moves(layer):
    make, name = LAYERS[layer]
    m, x = make(), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        before = m(x)
        getattr(m, name).add_(1)
        after = m(x)
        torch.testing.assert_close(after, _uncached(m, x), rtol=0, atol=0)
        assert not torch.allclose(after, before)
        other = make()
        m.load_state_dict(other.state_dict())
        torch.testing.assert_close(m(x), other(x), rtol=0, atol=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(m(x), _uncached(m, x), rtol=0, atol=0)
        m.double()
        xd = x.double()
        torch.testing.assert_close(m(xd), _uncached(m, xd), rtol=0, atol=0)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_cache_is_not_state_and_copies_start_empty(layer):
    make, name = LAYERS[layer]
    m = make()
    keys = set(m.state_dict())
    with torch.no_grad():
        m(torch.randn(1, 16, 8, 8))
    assert m._dense_cache._entry is not None
    assert set(m.state_dict()) == keys and name in keys
    assert copy.deepcopy(m)._dense_cache._entry is None


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_frozen_parameter_cache_survives_inference_mode_and_autograd_on_the_input(layer):
    """A weight cached under inference_mode is an inference tensor: it is not reused outside,
    where autograd may save it for the input's gradient."""
    make, name = LAYERS[layer]
    m = make()
    getattr(m, name).requires_grad_(False)
    x = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        m(x)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(m(xg).sum(), xg)
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(_uncached(m, xr).sum(), xr)
    torch.testing.assert_close(gx, want, rtol=0, atol=0)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_tracing_bypasses_the_cache(layer):
    """A traced module must read the parameter, not a weight frozen at trace time."""
    make, name = LAYERS[layer]
    m, x = make().eval(), torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        m(x)  # fill the cache
        traced = torch.jit.trace(m, (x,), check_trace=False)
        getattr(m, name).mul_(-2)
        torch.testing.assert_close(traced(x), _uncached(m, x))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_onnx_export_after_the_cache_is_filled(layer, tmp_path):
    """Export neither trips over nor bakes in a cached weight: the exported model computes the
    layer with the parameter as it is at export time."""
    ort = pytest.importorskip("onnxruntime")
    make, name = LAYERS[layer]
    m, x = make().eval(), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        getattr(m, name).mul_(-2)
        m(x)  # fill the cache: valid while exporting, yet export must not take it
        want = _uncached(m, x).numpy()
        torch.onnx.export(m, (x,), str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
