"""The new convolutions put to work: converting a model's layers, exploring the design space.

The layers themselves are in :mod:`leanconv.layers` (``SlidingChannelConv2d``, DSXplore
SCC; ``PeriodicSparseConv2d``, pSConv).

* :mod:`.convert`: swap a model's convs for DW + SCC or pSConv layers, in place;
* :mod:`.explore`: train and measure a grid of converted variants of one zoo model.
"""

from leanconv.convs.convert import CONVERSIONS, ConversionSpec, conversion_targets, convert

__all__ = ["CONVERSIONS", "ConversionSpec", "conversion_targets", "convert"]
