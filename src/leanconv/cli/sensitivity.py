"""``leanconv sensitivity CKPT``: per-channel and per-layer Hessian sensitivities (HAP)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanconv.util.files import write_json, write_together
from leanconv.cli.common import (add_data_args, add_model_args, add_output_args, add_seed_arg, data_from_meta,
                                 load_model, positive_float, positive_int, progress_bar, resolution_of)
from leanconv.errors import LeanconvError
from leanconv.importance import hessian
from leanconv.runs.prune import scoring_batches
from leanconv.report.plots import sensitivity_chart

__all__ = ["register", "run", "sensitivity_record"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="per-channel Hessian traces and HAP sensitivities",
                       description="Estimate Tr(H_pp) for every output channel of every conv/linear layer by "
                       "Hutchinson probes (batched Hessian-vector products, averaged over validation batches, "
                       "model in eval mode), stopping when the relative standard error is small enough or at "
                       "--probes. Writes DIR/sensitivity.json and DIR/sensitivity.png. Results are cached in "
                       "--cache-dir keyed by the weights, the data and the probe settings.")
    p.add_argument("ckpt", metavar="CKPT")
    add_model_args(p)
    p.add_argument("--probes", type=positive_int, default=64, help="cap on Hutchinson probes (default: 64)")
    p.add_argument("--min-probes", type=positive_int, default=None,
                   help="probes always run before the stopping rule may stop (default: 8, or --probes if fewer)")
    p.add_argument("--rel-stderr", type=positive_float, default=0.05,
                   help="stop when the median relative standard error is below this (default: 0.05)")
    p.add_argument("--probe-groups", default="1", metavar="G|layer",
                   help="split each probe into G groups of layers (or 'layer': one per layer): G times the HVPs "
                   "per probe, no cross-group noise in the per-channel estimates (default: 1)")
    p.add_argument("--images", type=positive_int, default=512, help="validation images (default: 512)")
    add_seed_arg(p)
    p.add_argument("--cache-dir", default=None, help="trace cache folder (default: DIR/cache)")
    add_data_args(p, default=None)
    add_output_args(p)
    p.set_defaults(func=run)


def sensitivity_record(model, result) -> dict:
    """Per-channel traces, standard errors and HAP sensitivities (from the raw traces, which
    ``leanconv prune --method hap`` ranks by, and from the shrunk ones, which ``--shrink``
    ranks by), and per-layer sums."""
    sens = result.hap_sensitivity(model)
    shrunk, shrunk_sens = result.shrunk_traces(), result.hap_sensitivity(model, shrink=True)
    layers = {n: {"trace": float(result.traces[n].sum()), "trace_stderr": float(result.stderr[n].pow(2).sum().sqrt()),
                  "sensitivity": float(sens[n].sum()), "channels": int(result.traces[n].numel())} for n in sens}
    return {"probes": result.probes, "converged": result.converged, "method": result.method,
            "seconds": result.seconds, "achieved_rel_stderr": result.achieved_rel_stderr, "layers": layers,
            "channels": {n: {"trace": result.traces[n].tolist(), "stderr": result.stderr[n].tolist(),
                             "sensitivity": sens[n].tolist(), "trace_shrunk": shrunk[n].tolist(),
                             "sensitivity_shrunk": shrunk_sens[n].tolist()} for n in sens}}


def _groups(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise LeanconvError(f"--probe-groups must be a positive whole number or 'layer', got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    if args.probes < 2:
        raise LeanconvError(f"--probes must be at least 2 (a standard error needs two), got {args.probes}")
    if args.min_probes is not None and not 2 <= args.min_probes <= args.probes:
        raise LeanconvError(f"--min-probes must lie between 2 and --probes ({args.probes}), got {args.min_probes}")
    model = load_model(args.ckpt, constructor=args.constructor)
    data = data_from_meta(model, args)
    batches = scoring_batches(data, args.images, args.batch_size, resolution_of(model, data))
    out = Path(args.out)
    update, close = progress_bar("hessian probes", enabled=not args.no_progress)
    settings = {"min_probes": args.min_probes or min(8, args.probes), "max_probes": args.probes,
                "rel_stderr": args.rel_stderr, "seed": args.seed, "progress": update,
                "probe_groups": args.probe_groups if args.probe_groups == "layer" else _groups(args.probe_groups)}
    try:
        result = hessian.cached_channel_traces(model, batches, Path(args.cache_dir or out / "cache"), **settings)
    finally:
        close()
    record = {"source": str(args.ckpt), "images": sum(len(y) for _, y in batches), **sensitivity_record(model, result)}
    title = f"HAP sensitivity per layer ({result.probes} probes, {record['images']} images)"
    write_together(out, {"sensitivity.json": lambda p: write_json(p, record),
                         "sensitivity.png": lambda p: sensitivity_chart(
                             {n: v["sensitivity"] for n, v in record["layers"].items()}, p, title=title)})
    print(json.dumps({"probes": result.probes, "converged": result.converged,
                      "median_rel_stderr": round(result.achieved_rel_stderr, 4), "seconds": round(result.seconds, 1),
                      "layers": len(record["layers"]), "out": str(out)}))
    return 0
