"""Samples ``(d, w, r, validation accuracy)`` for the 3-D accuracy predictor, and their store.

Wang et al., "Accelerate CNNs from Three Dimensions" (ICML 2021); methods.md Sec. 1, step 3.
Samples are collected cheaply by pruning the trained model **step by step along one
dimension at a time**, briefly fine-tuning after each step (``StepSettings.epochs`` epochs on
the first ``StepSettings.images`` training images) and recording the accuracy on the
**validation** split (never test):

* a **chain** per dimension: depth (whole block counts, down to the stage floors), width
  (``w`` steps down to ``w_min``) and resolution (integer sides down to ``min_side``); each
  step continues from the previous step's fine-tuned model, which is what makes a chain
  cheap. A chain is one executor task.
* **mixed** points, each realised independently from the trained model (one task each),
  placed on the analytic budget surface ``d w^2 r^2 = T`` (where the optimum lies) at
  low-discrepancy ``(d, r)`` positions.
* the **base** point ``(1, 1, 1)``: the trained model itself.

Every sample is one JSON line in an append-only ``samples.jsonl`` (:class:`SampleStore`),
written by the driver as each task finishes, so an interrupted run keeps its finished
tasks. A sample's key is ``SETTINGS/KIND:STEP`` where ``SETTINGS`` hashes the checkpoint's
bytes and the step settings: a re-run skips every task whose keys are all stored (a
partly stored chain is re-run and only its missing samples are appended).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from leanconv.errors import LeanconvError
from leanconv.importance.hessian.hap import HAP_ESTIMATOR
from leanconv.prune3d.realise import (Origin, StepSettings, brief_finetune, bypass_blocks, cost_ratio, load_origin,
                                      measure_point, prune_width, realise, val_accuracy)
from leanconv.prune3d.resolution import set_resolution
from leanconv.util.files import JsonlStore
from leanconv.util.progress import Progress

__all__ = [
    "SAMPLE_KINDS",
    "SampleStore",
    "settings_hash",
    "plan_tasks",
    "task_keys",
    "run_task",
    "collect_samples",
]

log = logging.getLogger(__name__)
SAMPLE_KINDS = ("base", "depth", "width", "resolution", "mixed")


class SampleStore(JsonlStore):
    """The samples file: a :class:`~leanconv.util.files.JsonlStore` whose records each carry a
    ``key``; reading drops later duplicates of a key."""

    def read(self, *, strict: bool = False) -> list[dict]:
        """All complete samples, in the order written (later duplicates of a key are dropped)."""
        out, seen = [], set()
        for sample in super().read(strict=strict):
            if "key" in sample and sample["key"] not in seen:
                seen.add(sample["key"])
                out.append(sample)
        return out

    def keys(self) -> set[str]:
        return {s["key"] for s in self.read()}

    def append(self, samples: Iterable[dict]) -> int:
        """Append ``samples`` (each must have a ``key``); returns how many were written."""
        samples = list(samples)
        if any("key" not in s for s in samples):
            raise LeanconvError("a sample needs a 'key' to be stored")
        return super().append(samples)


def settings_hash(ckpt: str | os.PathLike, settings: StepSettings) -> str:
    """12 hex digits naming the checkpoint's bytes and the settings that change a sample."""
    h = hashlib.sha256(Path(ckpt).read_bytes())
    fields = {k: v for k, v in asdict(settings).items()
              if k != "data_dir" and not (k in ("constructor", "input_shape", "latency") and v is None)
              and not (k == "hessian" and v == HAP_ESTIMATOR)  # hashes made before these settings existed
              and not (k == "reconstruct_images" and not v)}
    if settings.latency is not None:  # the reference is re-measured on every run: the setting is what counts
        fields["latency"] = {k: v for k, v in settings.latency.items() if k != "reference_ms"}
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- planning


def _spec(kind: str, step: Any) -> str:
    if kind == "depth":
        return f"keep={int(step)}"
    if kind == "width":
        return f"w={float(step):.4f}"
    if kind == "resolution":
        return f"side={int(step)}"
    if kind == "mixed":
        keep, w, side = step
        return f"keep={int(keep)},w={float(w):.4f},side={int(side)}"
    return "base"


def _steps(task: dict) -> list:
    return list(task["steps"]) if task["kind"] in ("depth", "width", "resolution") else [task.get("point")]


def task_keys(task: dict, prefix: str) -> list[str]:
    """The keys of the samples ``task`` produces, in order."""
    return [f"{prefix}/{task['kind']}:{_spec(task['kind'], s)}" for s in _steps(task)]


def _spread(levels: Sequence, k: int) -> list:
    """``k`` of ``levels`` (ordered from mild to severe), evenly spaced, always ending at the last."""
    k = min(k, len(levels))
    return [levels[math.ceil((i + 1) * len(levels) / k) - 1] for i in range(k)] if k > 0 else []


def _split(n: int, caps: Sequence[int | None]) -> list[int]:
    """``n`` steps over chains with capacity ``caps`` (None: unlimited), as evenly as possible."""
    counts = [0] * len(caps)
    for _ in range(n):
        open_ = [i for i, c in enumerate(caps) if c is None or counts[i] < c]
        if not open_:
            break
        counts[min(open_, key=lambda i: (counts[i], i))] += 1
    return counts


def plan_tasks(n_samples: int, *, n_blocks: int, min_keep: int, side: int, min_side: int, w_min: float,
               target: float, mixed: int | None = None) -> list[dict]:
    """The tasks that produce ``n_samples`` samples (the base point included).

    ``mixed`` (default: a quarter of the rest) points sit on the analytic budget surface;
    the others are shared among the depth, width and resolution chains as evenly as the
    discrete levels allow (depth has ``n_blocks - min_keep`` levels, resolution
    ``side - min_side``; width is continuous, from 1 down to ``w_min`` in even steps).
    """
    if n_samples < 4:
        raise LeanconvError(f"need at least 4 samples to fit a predictor, got {n_samples}")
    if not 0 < w_min < 1 or min_side > side:
        raise LeanconvError(f"need 0 < w_min < 1 and min_side <= side, got w_min={w_min}, min_side={min_side}")
    rest = n_samples - 1
    mixed = rest // 4 if mixed is None else int(mixed)
    if not 0 <= mixed <= rest:
        raise LeanconvError(f"mixed samples must be between 0 and {rest}, got {mixed}")
    depth_levels = list(range(n_blocks - 1, min_keep - 1, -1))
    side_levels = list(range(side - 1, min_side - 1, -1))
    n_depth, n_width, n_res = _split(rest - mixed, [len(depth_levels), None, len(side_levels)])
    tasks: list[dict] = [{"kind": "base"}]
    if n_depth:
        tasks.append({"kind": "depth", "steps": _spread(depth_levels, n_depth)})
    if n_width:
        tasks.append({"kind": "width", "steps": [round(1 - (i + 1) * (1 - w_min) / n_width, 4) for i in range(n_width)]})
    if n_res:
        tasks.append({"kind": "resolution", "steps": _spread(side_levels, n_res)})
    points = _mixed_points(mixed, n_blocks, min_keep, side, min_side, w_min, target)
    tasks += [{"kind": "mixed", "point": p} for p in points]
    return tasks


def _mixed_points(m: int, n_blocks: int, min_keep: int, side: int, min_side: int, w_min: float,
                  target: float) -> list[list]:
    """``m`` distinct points ``[keep, w, side]`` with ``(keep, side)`` from a golden-ratio
    sequence and ``w = sqrt(T / (d r^2))`` clipped to ``[w_min, 1]``."""
    out: list[list] = []
    for i in range(4 * m):
        if len(out) == m:
            break
        u, v = (0.5 + i * 0.6180339887) % 1.0, (0.5 + i * 0.7548776662) % 1.0
        keep = round(min_keep + u * (n_blocks - min_keep)) if n_blocks else 0
        s = round(min_side + v * (side - min_side))
        d, r = (keep / n_blocks if n_blocks else 1.0), s / side
        w = round(min(1.0, max(w_min, math.sqrt(target / (d * r * r)))), 4)
        point = [keep, w, s]
        if point not in out and not (keep == n_blocks and w >= 1 and s == side):
            out.append(point)
    return out


# ---------------------------------------------------------------- running (in a worker)


def _sample(origin: Origin, model, w: float, kind: str, key: str, t0: float) -> dict:
    accuracy = val_accuracy(model, origin.data)
    point = measure_point(model, origin, w)
    sample = {"key": key, "kind": kind, "d": point.d, "w": point.w, "r": point.r, "keep": point.keep,
              "side": point.side, "accuracy": accuracy, "macs": point.macs, "params": point.params,
              "seconds": time.perf_counter() - t0}
    if point.latency is None:
        return sample
    timed = {"latency_table": point.table_latency} if origin.timed else {}  # the latency was measured
    return {**sample, "latency": point.latency, **timed}


def _chain(origin: Origin, task: dict, keys: list[str]) -> list[dict]:
    """Prune one dimension step by step, fine-tuning briefly after each step."""
    kind, model, out = task["kind"], copy.deepcopy(origin.model), []
    for step, key in zip(task["steps"], keys):
        t0 = time.perf_counter()
        if kind == "depth":
            bypass_blocks(model, origin, int(step))
        elif kind == "width":
            prune_width(model, origin, float(step) ** 2 / cost_ratio(model, origin))
        else:
            set_resolution(model, int(step))
        brief_finetune(model, origin.data, origin.settings)
        w = math.sqrt(cost_ratio(model, origin)) if kind == "width" else 1.0
        out.append(_sample(origin, model, w, kind, key, t0))
    return out


def run_task(ckpt: str, settings: dict, task: dict, prefix: str) -> list[dict]:
    """One executor task (a top-level function: picklable): plain arguments, plain samples."""
    t0 = time.perf_counter()
    origin = load_origin(ckpt, StepSettings(**settings))
    keys = task_keys(task, prefix)
    torch.manual_seed(origin.settings.seed)
    if task["kind"] == "base":
        return [_sample(origin, origin.model, 1.0, "base", keys[0], t0)]
    if task["kind"] == "mixed":
        keep, w, side = task["point"]
        n = len(origin.blocks)
        model, point = realise(origin, keep / n if n else 1.0, float(w), side / origin.side)
        brief_finetune(model, origin.data, origin.settings)
        return [_sample(origin, model, point.w, "mixed", keys[0], t0)]
    if task["kind"] not in SAMPLE_KINDS:
        raise LeanconvError(f"unknown sample task kind {task['kind']!r}")
    return _chain(origin, task, keys)


# ---------------------------------------------------------------- collecting (in the driver)


def collect_samples(ckpt: str | os.PathLike, settings: StepSettings, tasks: Sequence[dict], store: SampleStore,
                    executor: Any, progress: Progress | None = None) -> list[dict]:
    """Run the tasks whose samples are not all stored yet on ``executor`` (see
    :mod:`leanconv.prune3d.executors`), append each task's new samples to ``store`` as it
    finishes, and return every stored sample of these settings. ``progress(done, total,
    info)`` is called once per finished task, counting samples."""
    prefix = settings_hash(ckpt, settings)
    stored = store.keys()
    todo = [t for t in tasks if not set(task_keys(t, prefix)) <= stored]
    total = sum(len(task_keys(t, prefix)) for t in tasks)
    done = total - sum(len(set(task_keys(t, prefix)) - stored) for t in todo)
    log.info("samples: %d of %d stored; %d tasks to run", done, total, len(todo))
    if progress is not None:
        progress(done, total, {"stage": "samples"})
    args = [(str(ckpt), asdict(settings), t, prefix) for t in todo]
    for _, samples in executor.run(run_task, args):
        new = [dict(s, settings_hash=prefix) for s in samples if s["key"] not in stored]
        store.append(new)
        stored |= {s["key"] for s in new}
        done += len(new)
        if progress is not None and samples:
            last = samples[-1]
            cost = {"latency": last["latency"]} if "latency" in last else {"macs": last["macs"]}
            progress(done, total, {"kind": last["kind"], "acc": last["accuracy"], **cost})
    return [s for s in store.read() if s.get("settings_hash") == prefix]
