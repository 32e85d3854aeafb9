"""PeriodicSparseConv2d: pattern tables, kernel path against the dense reference, gradcheck,
nonzero-only storage, zeros staying zero under SGD, MACs, specs, ONNX export."""

import numpy as np
import pytest
import torch

from leanconv.errors import LeanconvError
from leanconv.layers import PATTERNS, PeriodicSparseConv2d, module_from_spec, module_to_spec
from leanconv.layers._kernels import kernels_available
from leanconv.layers.periodic_sparse import pattern_mask

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="no C compiler: compiled kernels unavailable")

# density ((P - 1) * n + dense) / (9 * P) for n nonzeros per sparse kernel
DENSITY = {"psd4_p8": 37 / 72, "psd2_p8": 23 / 72, "psd1_p16": 24 / 144, "ps4_p4": 16 / 36}


def _grads(m: PeriodicSparseConv2d, x: torch.Tensor, gy: torch.Tensor):
    x = x.detach().requires_grad_()
    y = m(x)
    params = [m.weight_nz] + ([m.bias] if m.bias is not None else [])
    return (y, *torch.autograd.grad(y, (x, *params), gy))


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_density_and_support(pattern):
    period = len(PATTERNS[pattern])
    mask = pattern_mask(2 * period, 3 * period, pattern)
    assert mask.float().mean().item() == pytest.approx(DENSITY[pattern])
    i, j = 3, 5
    positions = set(mask[i, j].reshape(-1).nonzero().squeeze(1).tolist())
    assert positions == set(PATTERNS[pattern][(i + j + 1) % period])


def test_psd4_p8_table_matches_the_paper():
    mask = pattern_mask(1, 8, "psd4_p8")[0].reshape(8, 9)  # filter 0: t = j + 1
    support = [tuple(row.nonzero().squeeze(1).tolist()) for row in mask]
    assert support[0] == (0, 1, 3, 4) and support[4] == (0, 1, 3, 4)  # t = 1, 5: top-left
    assert support[1] == (1, 2, 4, 5) and support[2] == (3, 4, 6, 7)  # t = 2 top-right, 3 bottom-left
    assert support[3] == (4, 5, 7, 8)  # t = 4: bottom-right
    assert support[7] == tuple(range(9))  # t = 0: dense


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0), (1, 2)])
def test_forward_and_gradients_equal_reference(pattern, stride, padding):
    gen = torch.Generator().manual_seed(stride * 10 + padding)
    c_in, c_out = (int(v) for v in torch.randint(5, 21, (2,), generator=gen))
    h, w = (int(v) for v in torch.randint(3, 12, (2,), generator=gen))
    m = PeriodicSparseConv2d(c_in, c_out, stride=stride, padding=padding, pattern=pattern, bias=True).double()
    x = torch.randn(2, c_in, h, w, generator=gen, dtype=torch.float64)
    gy = torch.randn_like(m(x))
    m.impl = "reference"
    expected = _grads(m, x, gy)
    m.impl = "auto"
    for got, want in zip(_grads(m, x, gy), expected):
        torch.testing.assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize("size", [(16, 16), (8, 8), (5, 19)])
def test_kernel_float32_matches_reference(size):
    m = PeriodicSparseConv2d(24, 32, pattern="psd4_p8")
    x = torch.randn(3, 24, *size)
    gy = torch.randn(3, 32, *size)
    m.impl = "reference"
    expected = _grads(m, x, gy)
    m.impl = "kernel"
    # float32 sums in another order: the kernel adds in vector lanes as wide as the CPU's
    # (-march=native), the reference in oneDNN's CPU-dependent blocking. The rounding grows like
    # sqrt(products summed) ulps of the largest value (weight gradients sum 768 pixels and reach
    # ~100), so allow 4 x that where it exceeds the fixed 1e-4.
    terms = (24 * 9, 32 * 9, 3 * size[0] * size[1])  # per output, input gradient, weight gradient
    for got, want, n in zip(_grads(m, x, gy), expected, terms):
        atol = max(1e-4, 4 * n ** 0.5 * torch.finfo(torch.float32).eps * float(want.detach().abs().max()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


@needs_kernels
@pytest.mark.parametrize("size", [(2, 3), (9, 17)])
def test_kernel_row_group_tails(size):
    # 59 filters, period 8: classes of 7 and 8 rows run as tiles of 4 + 2 + 1 and 4 + 4
    m = PeriodicSparseConv2d(9, 59, pattern="psd4_p8").double()
    x = torch.randn(2, 9, *size, dtype=torch.float64)
    gy = torch.randn(2, 59, *size, dtype=torch.float64)
    m.impl = "reference"
    expected = _grads(m, x, gy)
    m.impl = "kernel"
    for got, want in zip(_grads(m, x, gy), expected):
        torch.testing.assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_gradcheck_kernel_path(pattern):
    m = PeriodicSparseConv2d(5, 6, pattern=pattern, impl="kernel").double()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    w = m.weight_nz.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(m, {"weight_nz": w}, (x,)), (x, w))


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_state_dict_holds_only_the_nonzeros(pattern):
    m = PeriodicSparseConv2d(16, 24, pattern=pattern)
    state = m.state_dict()
    assert set(state) == {"weight_nz"}
    nnz = int(pattern_mask(24, 16, pattern).sum())
    assert state["weight_nz"].numel() == nnz == round(DENSITY[pattern] * 16 * 24 * 9)
    assert sum(p.numel() for p in m.parameters()) == nnz
    assert int((m.dense_weight() != 0).sum()) == nnz


def test_zeros_stay_zero_under_sgd_with_momentum_and_weight_decay():
    m = PeriodicSparseConv2d(8, 8, pattern="psd2_p8", bias=True)
    off_support = ~pattern_mask(8, 8, "psd2_p8")
    before = m.dense_weight().detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        opt.zero_grad()
        m(torch.randn(4, 8, 6, 6)).square().mean().backward()
        opt.step()
    after = m.dense_weight().detach()
    assert torch.count_nonzero(after[off_support]) == 0
    assert (after - before)[~off_support].abs().min() > 0  # every kept weight moved


def test_count_macs_is_the_nonzero_count():
    m = PeriodicSparseConv2d(16, 8, stride=2, pattern="psd4_p8")
    x = torch.randn(3, 16, 9, 9)
    y = m(x)
    assert y.shape == (3, 8, 5, 5)
    nnz = int((m.dense_weight() != 0).sum())
    assert m.count_macs(x, y) == nnz * 5 * 5 * 3
    assert nnz == 16 * 8 * 9 * 37 // 72 == 592  # 16 * 8 kernels of 9 taps, 37/72 kept


def test_cost_counter_uses_the_layers_own_count():
    from torch import nn

    from leanconv.cost import count
    from leanconv.layers import SlidingChannelConv2d

    model = nn.Sequential(PeriodicSparseConv2d(16, 16, pattern="psd4_p8"), nn.ReLU(),
                          SlidingChannelConv2d(16, 32, groups=4, overlap=0.5, stride=2))
    report = count(model, (16, 8, 8))
    psc_macs = 16 * 16 * 9 * 37 // 72 * 8 * 8  # nonzeros x output pixels
    scc_macs = 32 * 4 * 4 * 4  # out channels x window x 4x4 output
    assert [layer.macs for layer in report.layers if layer.macs] == [psc_macs, scc_macs]
    assert report.macs == psc_macs + scc_macs == 77824


def test_spec_round_trip_rebuilds_identical_layer():
    m = PeriodicSparseConv2d(12, 20, stride=2, padding=1, pattern="psd1_p16", bias=True)
    spec = module_to_spec(m)
    assert spec["type"] == "PeriodicSparseConv2d" and spec["kwargs"]["pattern"] == "psd1_p16"
    rebuilt = module_from_spec(spec)
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(2, 12, 7, 7)
    assert torch.equal(rebuilt(x), m(x))


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 5},
    {"pattern": "psd3_p8"},
    {"stride": 0},
    {"impl": "fast"},
    {"kernel_size": (3, 1)},
])
def test_bad_arguments_raise_one_line_errors(kwargs):
    with pytest.raises(LeanconvError) as info:
        PeriodicSparseConv2d(8, 8, **kwargs)
    assert "\n" not in str(info.value)


def test_onnx_export_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = PeriodicSparseConv2d(16, 24, pattern="psd4_p8", bias=True).eval()
    x = torch.randn(2, 16, 8, 8)
    path = tmp_path / "psc.onnx"
    torch.onnx.export(m, (x,), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = m(x).numpy()
    assert got.shape == want.shape == (2, 24, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels,shape", [(4, (1, 2, 6, 6)), (4, (1, 6, 6, 6)), (256, (1, 1, 64, 64)), (4, (2, 4, 6))])
def test_compiled_kernels_refuse_inputs_of_the_wrong_shape(channels, shape):
    """The compiled kernels index the input without bounds checks: a wrong channel count must be
    an error before they run (it read past the input, or crashed, before)."""
    from leanconv.layers import SlidingChannelConv2d

    x = torch.randn(*shape)
    for layer in (PeriodicSparseConv2d(channels, 4), SlidingChannelConv2d(channels, 8, 2, 0.5)):
        with pytest.raises((LeanconvError, RuntimeError)), torch.no_grad():
            layer(x)


def test_sparse_kernels_give_the_same_gradients_on_every_run():
    """The compiled weight gradient sums per-thread partials in a fixed order (static tasks),
    so a training step repeats to the bit with several threads (it once depended on timing)."""
    from leanconv.layers import SlidingChannelConv2d

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(64, 32, 16, 16)
    for layer in (PeriodicSparseConv2d(32, 32, 3, 1, 1), SlidingChannelConv2d(32, 32, 2, 0.5)):
        runs = []
        for _ in range(4):
            layer.zero_grad()
            layer(x).square().sum().backward()
            runs.append([p.grad.clone() for p in layer.parameters()])
        for later in runs[1:]:
            for a, b in zip(runs[0], later):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
