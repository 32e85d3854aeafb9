"""Compiled CPU kernels behind leanconv's structured-sparse layers (private).

``sparse_rows.c`` holds the C kernels, ``loader`` builds and binds them, ``plan`` computes
their index plans and ``sparse_conv`` wraps them in an autograd function.
"""

from leanconv.layers._kernels.loader import kernel_library, kernels_available
from leanconv.layers._kernels.sparse_conv import SparseConvPlan, in_layout_of, kernels_usable, sparse_conv

__all__ = ["kernel_library", "kernels_available", "SparseConvPlan", "in_layout_of", "kernels_usable", "sparse_conv"]
