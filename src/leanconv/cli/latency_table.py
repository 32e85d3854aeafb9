"""``leanconv latency-table CKPT --out FILE``: measure, on this machine, the layer times a latency budget needs.

A latency table holds the measured time of every layer configuration that 'leanconv prune
--target-latency R' may choose for this model: each conv and linear layer at every channel
count on the runtime's staircase, timed alone on --runtime with --threads threads at batch
--batch. prune builds and caches such a table by itself on the machine it runs on; build one
here when the model will run on another machine: run this command there (the deployment
device), copy FILE back and prune with 'leanconv prune CKPT --target-latency R --latency-table
FILE' and the same --runtime, --threads and --batch (and the same runtime version); prune then
plans from the table's times, since nothing can be timed on the other CPU. An existing FILE
made for the same setting on this CPU is extended: its entries are kept and only the missing
ones measured (one file can serve several models; an interrupted run resumes). Any other FILE
is refused and left untouched. Prints one JSON line: the setting, the entries, how many were
measured and the seconds taken.

Developers: the configurations are :func:`leanconv.width.latency_budget.solver_configs`, the
table :class:`leanconv.cost.latency_table.LatencyTable`; measured entries are saved (atomically)
every :data:`SAVE_EVERY_S` seconds and when the run stops, so Ctrl-C loses little.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leanconv.cli.common import (add_checkpoint_args, batch_size_arg, input_shape_of, load_model, progress_bar,
                                 threads_arg)
from leanconv.cost.hardware import cpu_name
from leanconv.cost.latency_table import LatencyTable, LayerConfig, table_key
from leanconv.cost.runtimes import DEFAULT_RUNTIME, RUNTIMES
from leanconv.errors import LeanconvError
from leanconv.util.limits import MAX_BATCH, MAX_THREADS
from leanconv.util.model_io import example_input
from leanconv.width.latency_budget import solver_configs

__all__ = ["HELP", "SAVE_EVERY_S", "add_arguments", "run"]

HELP = "time the layers prune --target-latency needs, e.g. on the deployment device"
SAVE_EVERY_S = 30.0  # an interrupted run loses at most this long of measuring
_LOAD_ADVICE = "; build one for this setting with leanconv latency-table"  # ends LatencyTable.load's refusals


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES,
                   help=f"the runtime the model will run on (default: {DEFAULT_RUNTIME})")
    p.add_argument("--threads", type=threads_arg, default=1, metavar="T",
                   help=f"intra-op threads of the runtime, 1 to {MAX_THREADS} (default: 1)")
    p.add_argument("--batch", type=batch_size_arg, default=1, metavar="B",
                   help=f"batch size the latency target will hold for, 1 to {MAX_BATCH} (default: 1)")
    p.add_argument("--keep-unprunable", dest="strict", action="store_false",
                   help="for a prune run with --keep-unprunable (channels through layers leanconv cannot resize, "
                   "such as a channel shuffle, stay)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the table (JSON) to write, or to extend if it holds a table for this setting on this CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(out_file="out")  # main() checks it before any work


def _start(out: Path, key: dict[str, Any]) -> LatencyTable:
    """The table to extend: ``out``'s own when it holds one for ``key`` on this CPU, a new one
    when there is no ``out``; anything else is refused (and left as it is)."""
    if not out.exists():
        return LatencyTable(key)
    try:
        table = LatencyTable.load(out, key, strict=True)
    except LeanconvError as exc:  # its advice (build a table with this command) is moot here
        reason = str(exc).removesuffix(_LOAD_ADVICE)
        raise LeanconvError(f"{reason}; --out {str(out)!r} is left untouched: name another file") from None
    if not table.here:
        raise LeanconvError(f"--out {str(out)!r} holds a latency table measured on {table.key['cpu']}, not on this "
                            f"CPU ({cpu_name()}); one table holds one CPU's times, so it is left untouched: name "
                            "another file")
    return table


def _label(config: LayerConfig) -> str:
    """A configuration in a few characters, for the progress bar: ``conv 16->32 3x3/2 @16x16``."""
    if config.kind != "conv":
        return f"{config.kind} {config.cin}->{config.cout}"
    return f"conv {config.cin}->{config.cout} {config.kh}x{config.kw}/{config.stride} @{config.h}x{config.w}"


def _measure(table: LatencyTable, todo: Sequence[LayerConfig], out: Path,
             progress: Callable[[int, int, dict], None]) -> None:
    """Measure ``todo`` into ``table``, saving it to ``out`` every :data:`SAVE_EVERY_S` seconds
    and once more when the loop ends, however it ends (Ctrl-C, a layer the runtime refuses)."""
    saved_at, unsaved = time.monotonic(), False
    try:
        for done, config in enumerate(todo, 1):
            table.ensure([config])
            unsaved = True
            progress(done, len(todo), {"layer": _label(config)})
            if time.monotonic() - saved_at >= SAVE_EVERY_S:
                unsaved = False  # a save that fails is not tried again on the way out
                table.save(out)
                saved_at = time.monotonic()
    finally:
        if unsaved:
            table.save(out)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    key = table_key(args.runtime, args.threads, args.batch)  # a runtime that is not installed: one line, now
    table = _start(out, key)
    model = load_model(args.ckpt, constructor=args.constructor, input_shape=args.input_shape)
    shape = input_shape_of(model, args.input_shape)
    configs = solver_configs(model, example_input(model, shape), input_shape=shape, strict=args.strict)
    todo = table.missing(configs)
    if todo and not args.no_progress:
        print(f"leanconv: measuring {len(todo)} of {len(configs)} layer configurations on {args.runtime} "
              f"({args.threads} thread(s), batch {args.batch})", file=sys.stderr, flush=True)
    update, close = progress_bar("latency-table", enabled=not args.no_progress)
    try:
        _measure(table, todo, out, update)
    finally:
        close()
    summary = {"out": str(out), **{k: table.key[k] for k in ("runtime", "version", "threads", "batch", "cpu")},
               "entries": len(table.entries), "measured": len(todo), "seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(summary))
    return 0
