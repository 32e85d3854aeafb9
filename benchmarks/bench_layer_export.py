"""How long one latency-table entry takes: a layer written to ONNX directly against the exporter (not a test).

Every entry of a latency table (``leanconv.cost.latency_table.measure_layer``) prepares one
layer on the runtime and times it. This script measures whole entries both ways, interleaved
in rounds (each round measures every layer once with the direct writer and once through the
exporter, in alternating order), on ResNet-20's layer configurations at side 28, and prints
the median seconds per entry of each way, their ratio, and how far the two ways' layer timings
differ (they time the same ONNX nodes, so only by timing noise).

    .venv/bin/python benchmarks/bench_layer_export.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from leanconv.cost import runtimes
from leanconv.cost.latency_table import layer_configs, measure_layer
from leanconv.models import create


def _entries(configs, runtime: str, direct: bool) -> tuple[float, list[float]]:
    keep = runtimes.layer_onnx
    runtimes.layer_onnx = keep if direct else (lambda module, x: None)
    try:
        t0 = time.perf_counter()
        times = [measure_layer(c, runtime, 1, 1) for c in configs]
        return (time.perf_counter() - t0) / len(configs), times
    finally:
        runtimes.layer_onnx = keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino"))
    args = p.parse_args()
    configs = sorted(set(layer_configs(create("resnet20", in_channels=1, input_size=28), (1, 28, 28)).values()))
    _entries(configs[:3], args.runtime, True)  # imports and the runtime's first session
    per = {"direct": [], "exporter": []}
    layer_ms = {"direct": [], "exporter": []}
    for i in range(args.rounds):
        for way in (("direct", "exporter") if i % 2 == 0 else ("exporter", "direct")):
            seconds, times = _entries(configs, args.runtime, way == "direct")
            per[way].append(seconds)
            layer_ms[way].append(times)
    direct, exporter = np.median(per["direct"]), np.median(per["exporter"])
    diff = np.median(np.array(layer_ms["direct"]), 0) / np.median(np.array(layer_ms["exporter"]), 0) - 1
    print(json.dumps({"runtime": args.runtime, "layers": len(configs), "rounds": args.rounds,
                      "seconds_per_entry": {"direct": round(float(direct), 4), "exporter": round(float(exporter), 4)},
                      "exporter_over_direct": round(float(exporter / direct), 2),
                      "layer_time_difference_median_abs": round(float(np.median(np.abs(diff))), 3)}))


if __name__ == "__main__":
    main()
