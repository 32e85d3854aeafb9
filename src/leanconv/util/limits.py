"""The ranges leanconv accepts for every number a user or a file can give it.

One table, so that a command-line option, a dataset spec option and a checkpoint header
field that mean the same thing have the same range. The bounds are generous for real work
and keep what one value can make leanconv allocate or loop over bounded: a value outside
them is one :class:`~leanconv.errors.LeanconvError` (exit status 2) naming the option and its
range, before any work.

==========================  ==================  =============================================
what                        range               why this bound
==========================  ==================  =============================================
seed (every generator)      0 .. 2**32 - 1      what NumPy's and torch's generators accept
input side, resolution      1 .. 1024           the largest side a user's images are read at
input channels              1 .. 256            RGB, grayscale, multispectral stacks
values of one input image   <= 3 * 1024 * 1024  C * H * W: one 1024 x 1024 RGB image
classes                     1 .. 100,000        ImageNet-21k has 21,841
channels of one layer       1 .. 2**20          a checkpoint's layer spec (also its features)
batch size                  1 .. 65,536
epochs                      0/1 .. 100,000
repeats (latency)           1 .. 10,000
threads, workers            1 .. 1,024 (0 ..)
images (subsets, scoring)   1 .. 10**9          bounded by the data anyway; refuses nonsense
probes                      2 .. 100,000
synthetic images            n <= 10**7 and n * c * s * s <= 2**28 (train and test together)
==========================  ==================  =============================================

Besides these, a checkpoint cannot make leanconv build a model larger than its weights
(:mod:`leanconv.checkpoint_header`).
"""

from __future__ import annotations

__all__ = [
    "SEED_MAX", "MAX_SIDE", "MAX_INPUT_CHANNELS", "MAX_INPUT_VALUES", "MAX_CLASSES", "MAX_WIDTH", "MAX_BATCH",
    "MAX_EPOCHS", "MAX_REPEATS", "MAX_THREADS", "MAX_IMAGES", "MAX_PROBES", "MAX_STEPS", "MAX_SAMPLES",
    "MAX_SYNTHETIC_IMAGES", "MAX_SYNTHETIC_VALUES", "MAX_LR", "MAX_MODEL_ELEMENTS",
]

SEED_MAX = 2**32 - 1
MAX_SIDE = 1024
MAX_INPUT_CHANNELS = 256
MAX_INPUT_VALUES = 3 * 1024 * 1024
MAX_CLASSES = 100_000
MAX_WIDTH = 2**20
MAX_BATCH = 65_536
MAX_EPOCHS = 100_000
MAX_REPEATS = 10_000
MAX_THREADS = 1024
MAX_IMAGES = 10**9
MAX_PROBES = 100_000
MAX_STEPS = 1000  # rounds of iterative pruning
MAX_SAMPLES = 10_000  # 3-D pruning samples
MAX_SYNTHETIC_IMAGES = 10**7
MAX_SYNTHETIC_VALUES = 2**28  # uint8 pixels of the synthetic set: 256 MiB
MAX_LR = 1000.0  # learning rates (and weight decay): far above any that trains
MAX_MODEL_ELEMENTS = 2**27  # parameters + buffers a zoo model or a checkpoint's base may have beyond its file
