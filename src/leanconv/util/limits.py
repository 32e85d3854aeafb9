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
pruning rounds (--steps)    1 .. 1,000          each round scores and fine-tunes the model
3-D pruning samples         4 .. 10,000         each sample prunes and fine-tunes a model
blocks kept per stage       1 .. 1,000          no zoo or user net has stages this deep
grid of an optimum search   2 .. 10,001         the width grid of the 3-D optimum
channel groups              1 .. 2**20          SCC groups, --round-to, --probe-groups
learning rate               above 0 .. 1,000    far above any rate that trains
weight decay                0 .. 1,000
relative standard error     above 0 .. 1        the loosest stopping rule that means anything
values of one list option   1 .. 100            budgets, SCC groups and overlaps, pSConv patterns
bytes of a path, a name     <= 4,095, <= 255    Linux's PATH_MAX and NAME_MAX
synthetic images            n <= 10**7 and n * c * s * s <= 2**28 (train and test together)
one layer's output          <= 2**27 values     per image, a checkpoint's model (512 MiB float32)
one array of a user's .npz  <= 16 GiB           and no more than its member of the archive holds
==========================  ==================  =============================================

Besides these, a checkpoint cannot make leanconv build a model larger than its weights
(:mod:`leanconv.checkpoint_header`).
"""

from __future__ import annotations

__all__ = [
    "SEED_MAX", "MAX_SIDE", "MAX_INPUT_CHANNELS", "MAX_INPUT_VALUES", "MAX_CLASSES", "MAX_WIDTH", "MAX_BATCH",
    "MAX_EPOCHS", "MAX_REPEATS", "MAX_THREADS", "MAX_IMAGES", "MAX_PROBES", "MAX_STEPS", "MAX_SAMPLES",
    "MAX_SYNTHETIC_IMAGES", "MAX_SYNTHETIC_VALUES", "MAX_LR", "MAX_MODEL_ELEMENTS", "MAX_ACTIVATION",
    "MAX_ARRAY_BYTES", "MAX_BLOCKS", "MAX_GRID", "MAX_GROUPS", "MAX_REL_STDERR", "MAX_LIST", "MAX_PATH_BYTES",
    "MAX_NAME_BYTES", "MAX_TEMPERATURE",
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
MAX_BLOCKS = 1000  # residual blocks a stage keeps (3-D pruning)
MAX_GRID = 10_001  # points of the width grid of the 3-D optimum
MAX_GROUPS = MAX_WIDTH  # channel groups: SCC groups, --round-to, Hutchinson probe groups
MAX_REL_STDERR = 1.0  # the stopping rule of Hutchinson probes
MAX_TEMPERATURE = 1000.0  # a distillation temperature (softmax of logits / T): far above any that helps
MAX_LIST = 100  # values of one comma-separated option (budgets, SCC groups and overlaps, patterns)
MAX_PATH_BYTES = 4095  # a path leanconv reads or writes (Linux's PATH_MAX less the final NUL)
MAX_NAME_BYTES = 255  # one name in a path (NAME_MAX)
MAX_MODEL_ELEMENTS = 2**27  # parameters + buffers a zoo model or a checkpoint's base may have beyond its file
MAX_ARRAY_BYTES = 2**34  # one array of a user's .npz file
MAX_ACTIVATION = 2**27  # values one layer of a checkpoint's model may output for one image (checked on meta)
