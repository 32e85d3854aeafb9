"""``leanconv sensitivity CKPT``: per-channel and per-layer Hessian sensitivities (HAP).

Estimate Tr(H_pp) for every output channel of every conv/linear layer by Hutchinson probes
(batched Hessian-vector products, averaged over validation batches, model in eval mode),
stopping when the relative standard error is small enough or at --probes. Writes
DIR/sensitivity.json and DIR/sensitivity.png. Results are cached in --cache-dir keyed by the
weights, the data and the probe settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanconv.cli.common import (add_checkpoint_args, add_config_options, add_data_args, add_output_args, build_config,
                                 check_out_folder, progress_bar, source_from_args)
from leanconv.report.plots import sensitivity_chart
from leanconv.runs.sensitivity import SensitivityConfig, run_sensitivity

__all__ = ["HELP", "add_arguments", "run"]


HELP = "per-channel Hessian traces and HAP sensitivities"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    add_config_options(p, SensitivityConfig)
    p.add_argument("--cache-dir", default=None, help="trace cache folder (default: DIR/cache)")
    add_data_args(p, default=None, batch_size=False)
    add_output_args(p)


def run(args: argparse.Namespace) -> int:
    config = build_config(SensitivityConfig, args)
    if args.cache_dir is not None:
        check_out_folder(args.cache_dir, "--cache-dir")
    source = source_from_args(args, args.ckpt)
    out = Path(args.out)
    update, close = progress_bar("hessian probes", enabled=not args.no_progress)
    try:
        result = run_sensitivity(config, source, out=out, cache_dir=args.cache_dir, progress=update)
    finally:
        close()
    record = result.record.to_dict()
    title = f"HAP sensitivity per layer ({record['probes']} probes, {record['images']} images)"
    result.save(out, extra={"sensitivity.png": lambda p: sensitivity_chart(
                    {n: v["sensitivity"] for n, v in record["layers"].items()}, p, title=title)})
    print(json.dumps({"probes": record["probes"], "converged": record["converged"],
                      "median_rel_stderr": round(record["achieved_rel_stderr"], 4),
                      "seconds": round(record["seconds"], 1), "layers": len(record["layers"]), "out": str(out)}))
    return 0
