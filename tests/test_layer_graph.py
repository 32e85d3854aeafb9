"""A single layer written straight to ONNX (the latency table's fast path) is the exporter's graph."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from leanconv.cost.layer_graph import layer_onnx
from leanconv.deploy.onnx import write_for_runtime

LAYERS = [
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (1, 8, 9, 9)),
    (lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), (2, 8, 7, 7)),
    (lambda: nn.Conv2d(6, 12, (1, 3), padding=(0, 1), groups=3, bias=False), (1, 6, 5, 5)),
    (lambda: nn.Linear(5, 7), (3, 5)),
    (lambda: nn.Linear(5, 7), (2, 4, 5)),
    (lambda: nn.Linear(1, 1), (1, 1)),
]


def _nodes(model: onnx.ModelProto) -> list:
    return [(n.op_type, sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute))
            for n in model.graph.node]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_a_layer_written_directly_computes_the_layer_with_the_exporters_nodes(make, shape, tmp_path):
    torch.manual_seed(0)
    layer, x = make().eval(), torch.randn(*shape)
    graph = layer_onnx(layer, x)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), layer(x), rtol=1e-4, atol=1e-5)
    exported = onnx.load(str(write_for_runtime(layer, x, tmp_path / "m.onnx")))
    direct = onnx.load_from_string(graph)
    assert _nodes(direct) == _nodes(exported)
    assert direct.ir_version == exported.ir_version
    assert [o.version for o in direct.opset_import] == [o.version for o in exported.opset_import]


def test_anything_but_a_bare_conv_or_linear_layer_goes_through_the_exporter():
    x = torch.randn(1, 4, 6, 6)
    assert layer_onnx(nn.Sequential(nn.Conv2d(4, 4, 3)), x) is None
    assert layer_onnx(nn.Conv2d(4, 4, 3, padding_mode="reflect"), x) is None
    assert layer_onnx(nn.Conv2d(4, 4, 3, padding="same"), x) is None
    assert layer_onnx(nn.Linear(6, 3, bias=False), x) is None
