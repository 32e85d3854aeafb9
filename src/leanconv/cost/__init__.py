"""Cost of a model: parameters, MACs and FLOPs (= 2 x MACs), activation memory, measured latency.

* :mod:`~leanconv.cost.counting`: ``count(model, input_shape) -> CostReport`` by forward hooks.
* :mod:`~leanconv.cost.memory`: ``activation_memory`` (bytes, one image, peak and total).
* :mod:`~leanconv.cost.latency`: ``measure_latency`` (eager PyTorch) and
  ``measure_onnx_latency`` (onnxruntime CPU), both returning ``LatencyStats`` in ms.
* :mod:`~leanconv.cost.hardware`: ``simd_channels`` (the channel block a CPU conv computes in).
* :mod:`~leanconv.cost.profiling`: ``profile`` (the JSON record) and ``format_profile`` (a table).
"""

from leanconv.cost.counting import CostReport, LayerCost, count
from leanconv.cost.hardware import simd_channels
from leanconv.cost.latency import LatencyStats, measure_fastest_layout, measure_latency, measure_onnx_latency
from leanconv.cost.memory import activation_memory
from leanconv.cost.profiling import UNITS, format_profile, profile

__all__ = [
    # counting
    "count", "CostReport", "LayerCost",
    # memory
    "activation_memory",
    # latency
    "measure_latency", "measure_fastest_layout", "measure_onnx_latency", "LatencyStats",
    # hardware
    "simd_channels",
    # profile
    "profile", "format_profile", "UNITS",
]
