"""How a CPU conv's time follows its channel counts: the basis of ``--round-to auto``.

Times one 3x3 conv (batch 64, channels_last, eval, no bias) on a 28x28 and a 14x14 input,
once sweeping the output channels at fixed input channels and once the other way round, as
the median of ``--repeats`` calls of the thread's CPU time on one thread. On an AVX-512 CPU
the time is flat within each block of 16 output channels and linear in input channels; the
script prints each time next to the counted MACs ratio, and the block
``leanconv.cost.simd_channels()`` reports for this CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_conv_channels.py --out runs/conv_channels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from leanconv.cost import simd_channels

SWEEPS = [  # (spatial side, fixed channels, swept channels)
    (28, 16, [4, 8, 11, 12, 13, 16, 20, 24, 32]),
    (14, 32, [8, 16, 21, 24, 28, 32, 40, 48]),
]


def conv_ms(c_in: int, c_out: int, side: int, repeats: int) -> float:
    x = torch.randn(64, c_in, side, side).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(memory_format=torch.channels_last).eval()
    with torch.inference_mode():
        for _ in range(2):
            conv(x)
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            conv(x)
            times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, simd_channels() = {simd_channels()}")
    for side, fixed, swept in SWEEPS:
        for vary in ("out", "in"):
            shapes = [(fixed, c) if vary == "out" else (c, fixed) for c in swept]
            times = [conv_ms(c_in, c_out, side, args.repeats) for c_in, c_out in shapes]
            base = times[swept.index(fixed)]  # the unpruned fixed x fixed conv of this sweep
            for c, (c_in, c_out), ms in zip(swept, shapes, times):
                rows.append({"side": side, "c_in": c_in, "c_out": c_out, "ms": ms, "time_ratio": ms / base,
                             "mac_ratio": c / fixed})
                print(f"{side}x{side} in {c_in:3d} out {c_out:3d}: {ms:6.2f} ms, time x{ms / base:.2f} "
                      f"for MACs x{c / fixed:.2f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"simd_channels": simd_channels(), "threads": 1, "batch": 64,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
