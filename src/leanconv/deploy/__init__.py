"""The forms a model is deployed in, and how they are made.

* :mod:`.fold`: BatchNorm folded into the convolution that feeds it (what every runtime runs;
  ``leanconv.deploy.fold.fold`` also checks the outputs);
* :mod:`.onnx`: ONNX export checked against PyTorch, and ONNX Runtime (CPU) latency.
"""

from leanconv.deploy.fold import FoldResult, fold_batchnorm, foldable_pairs
from leanconv.deploy.onnx import export_onnx, measure_onnx_latency

__all__ = ["fold_batchnorm", "foldable_pairs", "FoldResult", "export_onnx", "measure_onnx_latency"]
