"""What the CPU's vector width means for the speed of a pruned convolution.

oneDNN, PyTorch's CPU convolution library, computes float32 convolutions in blocks of as many
output channels as one vector register holds: 16 with AVX-512, 8 with AVX2, 4 otherwise.
Measured on this project's AVX-512 machine (3x3 conv, batch 64, channels_last, one thread),
the time of a conv grows linearly with its *input* channels but in steps of 16 with its
*output* channels (``benchmarks/bench_conv_channels.py``: at 28x28 with 16 inputs, 4 to 16
outputs take 1.1-1.3 ms and 20 to 32 outputs 2.2-2.3 ms). A pruned layer whose channel count is not a multiple of the block pays
for the full block, so its speedup falls short of its MAC reduction; ``--round-to auto`` keeps
every pruned channel count a multiple of :func:`simd_channels`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["cpu_name", "simd_channels"]

_LANES = {"AVX512": 16, "AVX2": 8, "SVE256": 8}  # float32 lanes per vector register


def simd_channels() -> int:
    """Float32 lanes per vector register on this CPU (16, 8 or 4).

    Read from PyTorch's own dispatch level (``torch.backends.cpu.get_cpu_capability()``,
    which ``ATEN_CPU_CAPABILITY`` can lower), taken as a stand-in for the instruction set
    oneDNN uses; anything not listed (NEON, VSX, DEFAULT) counts as 4 lanes."""
    return _LANES.get(torch.backends.cpu.get_cpu_capability(), 4)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s first ``model name``, else what Python's
    :mod:`platform` knows), with its logical core count: it keys latency tables and is stated
    in every timing, because a latency holds on one CPU only."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    import os

    return f"{name} ({os.cpu_count() or 1} logical cores)"
