"""One layer as an ONNX graph, written directly: the latency table's fast path to a runtime.

A latency table times hundreds of single layers (:mod:`leanconv.cost.latency_table`), and
exporting each through PyTorch's ONNX exporter cost about 23 ms, most of a layer's
measurement. A bare ``nn.Conv2d`` or ``nn.Linear`` is one or two ONNX nodes, so
:func:`layer_onnx` writes them with ``onnx.helper``: the same nodes, attributes, opset (17)
and IR version (8) as the exporter writes for that layer (a conv: ``Conv``; a linear layer on
one row per image: ``Gemm`` with ``transB``; on several rows: ``MatMul`` then ``Add``), with
the layer's own weights. Anything else returns None and goes through the exporter.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["OPSET", "layer_onnx"]

OPSET = 17
IR_VERSION = 8
INPUT, OUTPUT = "input", "output"


def _plain_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
            and len(module.kernel_size) == 2)


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().float().cpu().numpy()


def layer_onnx(module: nn.Module, x: torch.Tensor) -> bytes | None:
    """``module`` (a bare conv or linear layer) on input ``x`` (its batch fixed) as a serialised
    ONNX model; None for any other module."""
    linear = type(module) is nn.Linear and module.bias is not None
    if not (_plain_conv(module) or linear):
        return None
    import onnx  # heavy import, only when a table is built
    from onnx import TensorProto, helper, numpy_helper

    with torch.no_grad():
        out_shape = list(module(x.float()).shape)
    weights = {"weight": _array(module.weight), "bias": _array(getattr(module, "bias", None))}
    if _plain_conv(module):
        (ph, pw), inputs = module.padding, [INPUT, "weight"] + (["bias"] if weights["bias"] is not None else [])
        nodes = [helper.make_node("Conv", inputs, [OUTPUT], dilations=list(module.dilation), group=module.groups,
                                  kernel_shape=list(module.kernel_size), pads=[ph, pw, ph, pw],
                                  strides=list(module.stride))]
    elif x.dim() == 2:
        nodes = [helper.make_node("Gemm", [INPUT, "weight", "bias"], [OUTPUT], alpha=1.0, beta=1.0, transB=1)]
    else:
        weights["weight"] = np.ascontiguousarray(weights["weight"].T)
        nodes = [helper.make_node("MatMul", [INPUT, "weight"], ["product"]),
                 helper.make_node("Add", ["bias", "product"], [OUTPUT])]
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in weights.items() if v is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()
