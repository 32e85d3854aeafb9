"""ImplantConv2d (HAP Neural Implant): outputs, alignment, exact MACs, spec round trip, ONNX,
and its two executions (split convs or one dense conv) agreeing in values and gradients."""

import copy
import io
import json
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from leanconv.cost import count
from leanconv.layers.implant import DENSE_BREAK_EVEN, ImplantConv2d, _runs
from leanconv.layers.spec import module_from_spec, module_to_spec

EPS32 = torch.finfo(torch.float32).eps


def _assert_same_sums(got, want, terms):
    """Split and dense execution add the same ``terms`` products per element in another order
    (two convs and a concatenation vs one conv; oneDNN's blocking also differs between CPUs), so
    float32 rounding grows like sqrt(terms) ulps of the largest value, not of each element:
    allow 4 x that (never less than the float32 default of 1e-5)."""
    atol = max(1e-5, 4 * terms ** 0.5 * EPS32 * float(want.abs().max()))
    assert_close(got, want, rtol=1.3e-6, atol=atol)


def _conv(**kw) -> nn.Conv2d:
    torch.manual_seed(1)
    args = dict(in_channels=5, out_channels=7, kernel_size=3, stride=1, padding=1, bias=False)
    args.update(kw)
    return nn.Conv2d(**args)


def test_zero_implant_equals_kept_filters_and_zeros():
    conv = _conv(stride=2)
    layer = ImplantConv2d.from_conv(conv, [1, 4, 5])
    x = torch.randn(2, 5, 11, 11)
    y, ref = layer(x), conv(x)
    assert y.shape == ref.shape == (2, 7, 6, 6)
    kept = [0, 2, 3, 6]
    assert_close(y[:, kept], ref[:, kept])
    assert torch.count_nonzero(y[:, [1, 4, 5]]) == 0
    assert layer.conv.out_channels == 4 and layer.implant.out_channels == 3


def test_implant_bias_keeps_original_bias_entries():
    conv = _conv(bias=True)
    layer = ImplantConv2d.from_conv(conv, [2])
    y = layer(torch.randn(1, 5, 6, 6))
    assert_close(y[0, 2], conv.bias[2].expand(6, 6).detach())


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(stride=2), dict(padding=0), dict(kernel_size=5, padding=2, stride=2), dict(padding=2, dilation=2),
     dict(kernel_size=(3, 5), padding=(1, 0))],
)
def test_implant_reads_the_centre_tap(kw):
    """A filter whose only nonzero tap is the centre is reproduced exactly by its 1x1 implant,
    for every stride, padding and dilation (checks the implant's spatial alignment)."""
    conv = _conv(**kw)
    kh, kw_ = conv.kernel_size
    implanted = [0, 3]
    with torch.no_grad():
        centre = conv.weight[implanted, :, kh // 2, kw_ // 2].clone()
        conv.weight[implanted] = 0
        conv.weight[implanted, :, kh // 2, kw_ // 2] = centre
    layer = ImplantConv2d.from_conv(conv, implanted)
    with torch.no_grad():
        layer.implant.weight.copy_(centre[:, :, None, None])
    x = torch.randn(2, 5, 13, 12)
    assert_close(layer(x), conv(x))


def test_count_macs_is_exact():
    conv = _conv(in_channels=6, out_channels=10, stride=2)
    layer = ImplantConv2d.from_conv(conv, [0, 1, 2])
    report = count(layer, (6, 16, 16))
    per_position = 8 * 8
    assert report.macs == per_position * (7 * 6 * 9 + 3 * 6)
    y = layer(torch.randn(3, 6, 16, 16))
    assert layer.count_macs(None, y) == 3 * report.macs
    assert report.params == 7 * 6 * 9 + 3 * 6
    assert report.macs < count(conv, (6, 16, 16)).macs


def test_spec_round_trip_gives_identical_outputs():
    layer = ImplantConv2d.from_conv(_conv(stride=2, bias=True), [5, 1])
    nn.init.normal_(layer.implant.weight)
    spec = json.loads(json.dumps(module_to_spec(layer)))
    assert spec["type"] == "ImplantConv2d"
    rebuilt = module_from_spec(spec)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 5, 9, 9)
    assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
    assert rebuilt.channel_order == layer.channel_order is not None


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ImplantConv2d(4, 2, 1, kernel_size=2)  # even kernel: no centre tap
    with pytest.raises(ValueError):
        ImplantConv2d(4, 2, 1, kernel_size=3, channel_order=[0, 0, 1])
    with pytest.raises(ValueError):
        ImplantConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), [1])


def test_gradients_reach_the_zero_implant():
    layer = ImplantConv2d.from_conv(_conv(), [2, 3])
    (layer(torch.randn(2, 5, 6, 6)) * torch.randn(2, 7, 6, 6)).sum().backward()
    assert layer.implant.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("execution", ["dense", "split"])
def test_onnx_export_matches_torch(execution):
    ort = pytest.importorskip("onnxruntime")
    layer = ImplantConv2d.from_conv(_conv(stride=2, padding=0), [0, 6]).eval()
    layer.execution = execution
    nn.init.normal_(layer.implant.weight)
    x = torch.randn(1, 5, 10, 10)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), buf, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_close(torch.from_numpy(y), layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_dense_weight_is_the_equivalent_plain_conv():
    conv = _conv(stride=2, padding=2, dilation=2, bias=True)
    layer = ImplantConv2d.from_conv(conv, [6, 0, 3])
    nn.init.normal_(layer.implant.weight)
    weight, bias = layer.dense_weight()
    assert weight.shape == conv.weight.shape
    x = torch.randn(2, 5, 12, 12)
    assert_close(layer.conv._conv_forward(x, weight, bias), layer(x))


EXECUTION_CASES = [dict(), dict(stride=2, bias=True), dict(padding=0), dict(padding=2, dilation=2, bias=True),
                   dict(kernel_size=(3, 5), padding=(1, 0))]


def _paths(layer: ImplantConv2d) -> dict[str, ImplantConv2d]:
    out = {}
    for execution in ("split", "dense", "auto"):
        out[execution] = copy.deepcopy(layer)
        out[execution].execution = execution
    return out


@pytest.mark.parametrize("kw", EXECUTION_CASES)
@pytest.mark.parametrize("reordered", [True, False])
def test_dense_and_split_execution_agree_with_gradients(kw, reordered):
    layer = ImplantConv2d.from_conv(_conv(**kw), [1, 4, 5])
    nn.init.normal_(layer.implant.weight)
    if not reordered:
        layer.set_channel_order(None)
    x = torch.randn(2, 5, 11, 10)
    grad_out = torch.randn_like(layer(x))
    results = {}
    for name, m in _paths(layer).items():
        xi = x.clone().requires_grad_(True)
        (m(xi) * grad_out).sum().backward()
        results[name] = (m(x), xi.grad, m.conv.weight.grad, m.implant.weight.grad)
    # products summed per element: outputs over C_in x taps, input gradients over C_out x taps,
    # weight gradients over every output position of the batch (up to 220, values up to ~45)
    taps = layer.conv.kernel_size[0] * layer.conv.kernel_size[1]
    positions = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
    terms = (layer.in_channels * taps, layer.out_channels * taps, positions, positions)
    for name in ("dense", "auto"):
        for got, want, n in zip(results[name], results["split"], terms):
            _assert_same_sums(got, want, n)


def test_runs_cover_the_order_with_fewest_slices():
    assert _runs([0, 4, 1, 2, 5, 3], kept=4) == ((0, 0, 1), (1, 0, 1), (0, 1, 3), (1, 1, 2), (0, 3, 4))
    assert _runs([2, 0, 1], kept=2) == ((1, 0, 1), (0, 0, 2))


def test_auto_execution_follows_the_break_even_rule():
    small = ImplantConv2d(16, 13, 3, kernel_size=3, padding=1)  # CIFAR-sized: one dense conv
    assert small.runs_dense()
    wide = ImplantConv2d(128, 96, 32, kernel_size=3, padding=1)  # many implants in a wide layer: split
    assert not wide.runs_dense()
    # 8 implants x 8 zero taps x C_in against DENSE_BREAK_EVEN x (C_in + 2 C_out)
    edge_in = DENSE_BREAK_EVEN * 2 * 9 // (8 * 8 - DENSE_BREAK_EVEN)
    assert ImplantConv2d(edge_in, 1, 8, kernel_size=3).runs_dense()
    assert not ImplantConv2d(edge_in + 1, 1, 8, kernel_size=3).runs_dense()
    wide.execution = "dense"
    assert wide.runs_dense()
    with pytest.raises(ValueError):
        wide.execution = "fast"


class _AtenLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops(layer: nn.Module, x: torch.Tensor) -> list[str]:
    with torch.no_grad():
        layer(x)  # fills the dense weight cache
        with _AtenLog() as log:
            layer(x)
    return log.ops


def test_inference_runs_one_conv_and_no_gather():
    """Counts of what actually runs per call: dense = one convolution (cached weight);
    split = two convolutions and one concatenation, never an index_select."""
    layer = ImplantConv2d.from_conv(_conv(), [1, 4]).eval()
    x = torch.randn(2, 5, 8, 8)
    paths = _paths(layer)
    assert _ops(paths["dense"], x) == ["convolution"]
    split = _ops(paths["split"], x)
    assert split.count("convolution") == 2 and split.count("cat") == 1 and "index_select" not in split
    paths["split"].set_channel_order(None)
    assert sorted(_ops(paths["split"], x)) == ["cat", "convolution", "convolution"]


def test_dense_cache_follows_weight_changes():
    layer = ImplantConv2d.from_conv(_conv(bias=True), [0, 3]).eval()
    layer.execution = "dense"
    x = torch.randn(2, 5, 7, 7)
    with torch.no_grad():
        first = layer(x)
        nn.init.normal_(layer.implant.weight)  # in place: bumps the version
        layer.conv.bias.add_(1.0)
        second = layer(x)
        reference = copy.deepcopy(layer)
        reference.execution = "split"
        terms = 5 * 9  # dense vs split: each output sums C_in x 3 x 3 products in another order
        _assert_same_sums(second, reference(x), terms)
        assert not torch.allclose(first, second)
        layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
        reference.load_state_dict(layer.state_dict())
        _assert_same_sums(layer(x), reference(x), terms)
        layer.conv.weight = nn.Parameter(torch.randn_like(layer.conv.weight))  # a new tensor
        layer.implant.weight.data = torch.randn_like(layer.implant.weight)  # new storage, same object
        reference.load_state_dict(layer.state_dict())
        _assert_same_sums(layer(x), reference(x), terms)
        nhwc = layer.to(memory_format=torch.channels_last)
        y = nhwc(x.contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last)
        _assert_same_sums(y, reference(x), terms)
