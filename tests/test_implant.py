"""ImplantConv2d (HAP Neural Implant): outputs, alignment, exact MACs, spec round trip, ONNX."""

import io
import json
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from leanconv.cost import count
from leanconv.layers.implant import ImplantConv2d
from leanconv.layers.spec import module_from_spec, module_to_spec


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


def test_onnx_export_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    layer = ImplantConv2d.from_conv(_conv(stride=2, padding=0), [0, 6]).eval()
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
