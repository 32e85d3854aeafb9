"""pSConv as a sum of dense grouped convs (impl="grouped"): exact, trainable, exportable, saved with the layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanconv import checkpoint
from leanconv.errors import LeanconvError
from leanconv.layers import PeriodicSparseConv2d, SlidingChannelConv2d
from leanconv.layers.periodic_sparse import PATTERNS, has_grouped_form


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("cin,cout,stride,padding", [(16, 32, 1, 1), (32, 16, 2, 1), (16, 16, 1, 0),
                                                      (48, 32, 2, 2)])
def test_grouped_equals_the_reference_forward_and_backward(pattern, cin, cout, stride, padding):
    torch.manual_seed(0)
    if not has_grouped_form(cin, cout, pattern):
        pytest.skip("channels are not multiples of this pattern's period")
    layer = PeriodicSparseConv2d(cin, cout, stride=stride, padding=padding, pattern=pattern, bias=True,
                                 impl="grouped").double()
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = F.conv2d(x, layer.dense_weight(), layer.bias, stride, padding)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = (x, layer.weight_nz, layer.bias)
    torch.testing.assert_close(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g))


def test_grouped_gradcheck():
    layer = PeriodicSparseConv2d(8, 8, pattern="psd4_p8", impl="grouped").double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: layer.__class__.forward(_with(layer, w), x), (x, layer.weight_nz))


def _with(layer, weight):
    clone = PeriodicSparseConv2d(8, 8, pattern="psd4_p8", impl="grouped").double()
    del clone.weight_nz
    clone.weight_nz = weight
    return clone


def test_grouped_needs_channels_that_are_multiples_of_the_period():
    with pytest.raises(LeanconvError, match="multiples of the pattern's period 8"):
        PeriodicSparseConv2d(12, 16, pattern="psd4_p8", impl="grouped")
    assert not has_grouped_form(12, 16, "psd4_p8") and has_grouped_form(16, 24, "psd4_p8")


@pytest.mark.parametrize("to,impl", [("psconv", "grouped"), ("psconv", "kernel"), ("scc", "kernel")])
def test_the_chosen_form_is_saved_reloaded_and_exported(to, impl, tmp_path):
    import onnxruntime as ort

    from leanconv.convs.convert import convert
    from leanconv.convs.placement import set_form
    from leanconv.deploy.onnx import export_onnx
    from leanconv.models import create

    torch.manual_seed(0)
    net = create("resnet20", in_channels=3, input_size=8, num_classes=4)
    convert(net, to, groups=2 if to == "scc" else None, layers=["layer2.0.conv2", "layer3.1.conv2"])
    set_form(net.layer3[1].conv2, impl)
    path = tmp_path / "m.safetensors"
    checkpoint.save(net, path)
    back = checkpoint.load(path).eval()
    new = [m for m in back.modules() if isinstance(m, (PeriodicSparseConv2d, SlidingChannelConv2d))]
    assert [m.impl for m in new] == ["auto", impl]
    x = torch.randn(2, 3, 8, 8)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    export_onnx(net, (3, 8, 8), tmp_path / "m.onnx", latency=False)  # checks ONNX Runtime against PyTorch
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), net(x), rtol=1e-4, atol=1e-4)


def test_sliding_channel_bias_in_every_form_and_saved():
    from leanconv.layers._kernels import kernels_available

    torch.manual_seed(0)
    impls = ["reference", "grouped", "gather"] + (["kernel"] if kernels_available() else [])
    base = SlidingChannelConv2d(16, 24, groups=4, overlap=0.5, bias=True).double()
    with torch.no_grad():
        base.bias.uniform_(-1, 1)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x, base.dense_weight(), base.bias)
    for impl in impls:
        layer = SlidingChannelConv2d(16, 24, groups=4, overlap=0.5, bias=True, impl=impl).double()
        layer.load_state_dict(base.state_dict())
        torch.testing.assert_close(layer(x), expected)
    assert base.spec_kwargs()["bias"] is True and "bias" not in SlidingChannelConv2d(16, 24, 4, 0.5).spec_kwargs()
