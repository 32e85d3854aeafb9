"""leanconv's layers: the module spec table and the new convolution types.

Importing this package registers every leanconv layer with the spec table, so checkpoints
that name them can be rebuilt.
"""

from leanconv.layers.spec import is_registered, layer_types, module_from_spec, module_to_spec, register_layer
from leanconv.layers.sliding_channel import SlidingChannelConv2d
from leanconv.layers.periodic_sparse import PATTERNS, PeriodicSparseConv2d
from leanconv.layers.implant import ImplantConv2d

__all__ = [
    # spec table
    "register_layer",
    "layer_types",
    "module_to_spec",
    "module_from_spec",
    "is_registered",
    # layers
    "SlidingChannelConv2d",
    "PeriodicSparseConv2d",
    "PATTERNS",
    "ImplantConv2d",
]
