"""SlidingChannelConv2d: window formula, every implementation against the dense reference,
gradcheck for every overlap, MACs, specs, ONNX export."""

import math

import numpy as np
import pytest
import torch

from leanconv.errors import LeanconvError
from leanconv.layers import SlidingChannelConv2d, module_from_spec, module_to_spec
from leanconv.layers._kernels import kernels_available
from leanconv.layers.sliding_channel import window_starts

OVERLAPS = [0, 0.25, 0.33, 0.5, 0.75, 0.9]
GROUPS = [1, 2, 4, 8]
FAST_IMPLS = ["kernel", "grouped", "gather"]


def _skip_without_kernels(impl: str) -> None:
    if impl == "kernel" and not kernels_available():
        pytest.skip("no C compiler: compiled kernels unavailable")


def _grads(m: SlidingChannelConv2d, x: torch.Tensor, gy: torch.Tensor):
    x = x.detach().requires_grad_()
    y = m(x)
    gx, gw = torch.autograd.grad(y, (x, m.weight), gy)
    return y, gx, gw


def test_window_starts_follow_the_formula_exactly():
    # cw = 4, step (1 - 0.5) * 4 = 2: windows start every 2 channels and wrap at 8
    assert window_starts(8, 6, 2, 0.5) == [0, 2, 4, 6, 0, 2]
    # cw = 32, o = 0.9: step 3.2 exactly, so channel 5 starts at 16 (float math gives 15)
    assert window_starts(128, 6, 4, 0.9)[5] == 16
    # o = 0.33, cw = 32: step 21.44
    assert window_starts(128, 4, 4, 0.33) == [0, 21, 42, 64]


def test_dense_weight_places_each_weight_at_its_cyclic_channel():
    m = SlidingChannelConv2d(8, 5, groups=2, overlap=0.25)  # cw 4, step 3
    dense = m.dense_weight()[:, :, 0, 0]
    expected = torch.zeros(5, 8)
    for c in range(5):
        start = math.floor(c * 3) % 8
        for k in range(4):
            expected[c, (start + k) % 8] = m.weight[c, k]
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)
    assert int((dense != 0).sum()) == 5 * 4


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_forward_and_gradients_equal_reference(impl, groups, overlap):
    _skip_without_kernels(impl)
    gen = torch.Generator().manual_seed(groups * 100 + int(overlap * 100))
    c_in = 8 * int(torch.randint(1, 3, (1,), generator=gen))
    c_out = int(torch.randint(3, 20, (1,), generator=gen))
    h, w = (int(v) for v in torch.randint(1, 9, (2,), generator=gen))
    stride = int(torch.randint(1, 3, (1,), generator=gen))
    m = SlidingChannelConv2d(c_in, c_out, groups, overlap, stride=stride).double()
    x = torch.randn(3, c_in, h, w, generator=gen, dtype=torch.float64)
    gy = torch.randn_like(m(x))
    m.impl = "reference"
    expected = _grads(m, x, gy)
    m.impl = impl
    for got, want in zip(_grads(m, x, gy), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_float32_matches_reference_on_the_benchmark_layout(impl):
    _skip_without_kernels(impl)
    m = SlidingChannelConv2d(32, 48, groups=4, overlap=0.5)
    x = torch.randn(4, 32, 16, 16)
    gy = torch.randn(4, 48, 16, 16)
    m.impl = "reference"
    expected = _grads(m, x, gy)
    m.impl = impl
    # float32 sums in another order (the kernel's vector lanes are as wide as the CPU's, oneDNN's
    # blocking is CPU-dependent too): rounding grows like sqrt(products summed) ulps of the
    # largest value (weight gradients sum 1024 pixels and reach ~100), so allow 4 x that where
    # it exceeds the fixed 1e-4.
    terms = (m.window, m.out_channels, 4 * 16 * 16)  # per output, input gradient, weight gradient
    for got, want, n in zip(_grads(m, x, gy), expected, terms):
        atol = max(1e-4, 4 * n ** 0.5 * torch.finfo(torch.float32).eps * float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("impl", ["kernel", "grouped"])
def test_gradcheck(impl, overlap):
    _skip_without_kernels(impl)
    m = SlidingChannelConv2d(8, 7, groups=2, overlap=overlap, impl=impl).double()
    x = torch.randn(2, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(m, {"weight": w}, (x,)), (x, w))


def test_second_derivatives_of_the_kernel_path_equal_reference():
    if not kernels_available():
        pytest.skip("no C compiler: compiled kernels unavailable")
    m = SlidingChannelConv2d(8, 6, groups=4, overlap=0.75).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    v = torch.randn_like(m.weight)

    def hvp(impl):
        m.impl = impl
        loss = (m(x) ** 2).sum()
        (g,) = torch.autograd.grad(loss, m.weight, create_graph=True)
        return torch.autograd.grad((g * v).sum(), m.weight)[0]

    torch.testing.assert_close(hvp("kernel"), hvp("reference"))


def test_kernel_threads_agree():
    if not kernels_available():
        pytest.skip("no C compiler: compiled kernels unavailable")
    m = SlidingChannelConv2d(16, 16, groups=4, overlap=0.33, impl="kernel").double()
    x = torch.randn(5, 16, 4, 4, dtype=torch.float64)
    before = torch.get_num_threads()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(_grads(m, x, torch.ones(5, 16, 4, 4, dtype=torch.float64)))
    torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_without_kernels_auto_uses_the_reference_and_kernel_refuses(monkeypatch):
    from leanconv.layers._kernels import loader

    monkeypatch.setattr(loader, "_LOADED", {})
    monkeypatch.setattr(loader, "_compiler", lambda: None)  # as on a machine without a C compiler
    assert not kernels_available()
    m = SlidingChannelConv2d(8, 8, groups=2, overlap=0.5)
    x = torch.randn(2, 8, 3, 3)
    assert m._resolve_impl(x) == "reference"
    torch.testing.assert_close(m(x), torch.nn.functional.conv2d(x, m.dense_weight()))
    m.impl = "kernel"
    with pytest.raises(LeanconvError):
        m(x)


def test_count_macs_is_the_nonzero_count():
    m = SlidingChannelConv2d(16, 12, groups=4, overlap=0.5, stride=2)
    x = torch.randn(3, 16, 9, 9)
    y = m(x)
    assert y.shape == (3, 12, 5, 5)
    nonzero = int((m.dense_weight() != 0).sum())
    assert nonzero == 12 * 4
    assert m.count_macs(x, y) == nonzero * 5 * 5 * 3 == 3600


def test_spec_round_trip_rebuilds_identical_layer():
    m = SlidingChannelConv2d(16, 12, groups=4, overlap=0.33, stride=2)
    spec = module_to_spec(m)
    assert spec == {"type": "SlidingChannelConv2d", "kwargs": {"in_channels": 16, "out_channels": 12,
                                                                "groups": 4, "overlap": 0.33, "stride": 2}}
    rebuilt = module_from_spec(spec)
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 6, 6)
    assert torch.equal(rebuilt(x), m(x))
    assert set(m.state_dict()) == {"weight"}


@pytest.mark.parametrize("kwargs", [
    {"in_channels": 10, "out_channels": 4, "groups": 4, "overlap": 0.5},
    {"in_channels": 8, "out_channels": 4, "groups": 2, "overlap": 1.0},
    {"in_channels": 8, "out_channels": 4, "groups": 2, "overlap": -0.1},
    {"in_channels": 8, "out_channels": 0, "groups": 2, "overlap": 0.5},
    {"in_channels": 8, "out_channels": 4, "groups": 2, "overlap": 0.5, "impl": "fast"},
])
def test_bad_arguments_raise_one_line_errors(kwargs):
    with pytest.raises(LeanconvError) as info:
        SlidingChannelConv2d(**kwargs)
    assert "\n" not in str(info.value)


def test_onnx_export_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = SlidingChannelConv2d(16, 24, groups=4, overlap=0.33, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    path = tmp_path / "scc.onnx"
    torch.onnx.export(m, (x,), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = m(x).numpy()
    assert got.shape == want.shape == (2, 24, 4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_wide_grouped_layer_exports_as_a_handful_of_nodes(tmp_path):
    """The grouped form's gather indices are constants, not traced ops: a 160 -> 960 layer once
    exported as thousands of nodes and took half a minute of constant folding."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from leanconv.deploy.onnx import write_for_runtime

    m = SlidingChannelConv2d(160, 960, groups=2, overlap=0.5).eval()
    m.impl = "grouped"
    x = torch.randn(1, 160, 4, 4)
    path = write_for_runtime(m, x, tmp_path / "scc.onnx")
    assert len(onnx.load(str(path)).graph.node) < 20
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = m(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
