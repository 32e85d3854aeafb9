"""Three-dimensional pruning end to end: samples -> predictor -> budgeted optimum -> model.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021 (methods.md Sec. 1). ``run_prune3d`` is what ``leanconv prune3d`` calls:

1. check that the budget is reachable inside the search box (fewest blocks, ``w_min``,
   ``r_min``) before any work;
2. collect samples ``(d, w, r, validation accuracy)`` by iterative one-dimensional pruning
   plus a few mixed points (:mod:`.samples`), on any executor (:mod:`.executors`), kept in
   ``OUT/samples.jsonl`` (resumable). With ``clip_box`` (the default) the width and
   resolution chains stop a little below the level that alone meets the budget (see
   :func:`sampling_floors`): no point under the budget needs less, and samples far beyond
   it (a collapsed w=0.4 network, say) only drag the fit away from where the optimum lies;
3. fit the accuracy predictor (``select_predictor``: form, K, R by cross-validation; the
   held-out check of the low-rank form against the full polynomial with <= 10 training
   samples is recorded) and calibrate the MACs model on the samples' counted MACs;
4. maximise the predicted accuracy under ``MACs <= target * MACs_0`` over whole block
   counts and integer sides >= 8, realise the choice (:mod:`.realise`), count its MACs and
   re-solve with a tighter budget while the count misses (``resolve``); a choice well under
   the budget is widened to just under it (:func:`_fill_budget`);
5. fine-tune the realised model at its resolution, re-estimate BatchNorm, evaluate (test
   split for the report only), measure latency, and write ``OUT/model.safetensors`` and
   ``OUT/record.json`` (plots: :mod:`leanconv.report.plots3d`, from the record alone).

MACs are multiply-accumulates for one image (FLOPs = 2 x MACs: the same ratios).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from leanconv import checkpoint
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.prune3d.blocks import prune_blocks
from leanconv.runs.prune import measure
from leanconv.prune3d.executors import LocalExecutor
from leanconv.prune3d.optimum import AnalyticCost, CalibratedCost, discrete_ratios, resolve
from leanconv.prune3d.predictor import is_monotone
from leanconv.prune3d.realise import Origin, StepSettings, brief_finetune, load_origin, min_side, realise, val_accuracy
from leanconv.prune3d.samples import SampleStore, collect_samples, plan_tasks
from leanconv.prune3d.selection import compare_on_holdout, select_predictor
from leanconv.util.files import write_json
from leanconv.util.progress import Progress

__all__ = ["Prune3dConfig", "Prune3dResult", "run_prune3d", "check_budget", "fit_samples", "budget_curve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prune3dConfig:
    """Settings of one three-dimensional pruning run (``leanconv prune3d`` options)."""

    target: float = 0.33  # keep this fraction of the counted MACs (= FLOPs ratio)
    samples: int = 16  # samples in all, the unpruned point included
    mixed: int | None = None  # mixed (d, w, r) samples; None: a quarter of the rest
    method: str = "hap"  # channel criterion for the width steps
    normalize: str = "mean"  # ... and its score scaling (leanconv prune --normalize)
    sample_epochs: int = 1  # brief fine-tuning after each sampling step
    sample_images: int | None = 2000  # ... on this many training images (None: all)
    finetune_epochs: int = 3  # final fine-tuning of the chosen model, full training split
    lr: float = 0.01  # learning rate of every fine-tuning
    batch_size: int = 128
    score_images: int = 512  # validation images for block and channel scores
    probes: int = 32  # cap on Hutchinson probes (hap)
    w_min: float = 0.4  # the search box: width down to w_min ...
    r_min: float = 0.5  # ... resolution down to r_min (and 8 pixels) ...
    min_blocks_per_stage: int = 1  # ... and depth down to this many blocks per stage
    clip_box: bool = True  # sample width/resolution only down to just below their budget level
    monotone: bool = True  # prefer predictors non-decreasing in d, w, r (falls back if none)
    holdout_train: int = 10  # training samples of the full vs low-rank held-out check
    grid: int = 101  # width grid of the optimum
    seed: int = 0
    latency_repeats: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise LeanconvError(f"target must lie strictly between 0 and 1, got {self.target}")
        if self.samples < 4:
            raise LeanconvError(f"need at least 4 samples to fit the predictor, got {self.samples}")
        if not (0 < self.w_min < 1 and 0 < self.r_min <= 1):
            raise LeanconvError(f"need 0 < w_min < 1 and 0 < r_min <= 1, got {self.w_min} and {self.r_min}")
        if self.finetune_epochs < 0 or self.holdout_train < 3 or self.grid < 2 or self.latency_repeats < 1:
            raise LeanconvError("finetune epochs >= 0, holdout_train >= 3, grid >= 2, latency repeats >= 1")

    def step_settings(self, data: str, data_dir: str | None = None) -> StepSettings:
        return StepSettings(data=data, data_dir=data_dir, method=self.method, normalize=self.normalize,
                            score_images=self.score_images, probes=self.probes,
                            min_per_stage=self.min_blocks_per_stage, epochs=self.sample_epochs,
                            images=self.sample_images, lr=self.lr, batch_size=self.batch_size, seed=self.seed)


@dataclass
class Prune3dResult:
    """The fine-tuned pruned model and the JSON-able record written to ``record.json``."""

    model: nn.Module
    record: dict


def check_budget(origin: Origin, config: Prune3dConfig) -> dict:
    """Raise ``LeanconvError`` (one line) unless the smallest model of the search box meets the
    budget; returns the box. The smallest model bypasses the costliest removable blocks down
    to the stage floors, runs at the smallest side, and keeps ``w_min^2`` of its MACs."""
    model = copy.deepcopy(origin.model)
    if origin.blocks:
        costly_first = {b.path: -float(b.macs) for b in origin.blocks}
        prune_blocks(model, origin.blocks, costly_first, origin.min_keep, min_per_stage=config.min_blocks_per_stage)
    side = min_side(origin, config.r_min)
    smallest = config.w_min ** 2 * count(model, (origin.shape[0], side, side)).macs / origin.macs
    box = {"d_min": origin.min_keep / len(origin.blocks) if origin.blocks else 1.0, "w_min": config.w_min,
           "side_min": side, "r_min": side / origin.side, "smallest_macs_ratio": smallest}
    if smallest > config.target:
        raise LeanconvError(
            f"impossible budget: target {config.target:g} of the MACs, but the smallest model in the search box "
            f"(d={box['d_min']:.3g}, w={config.w_min:g}, side {side}) keeps {smallest:.3f}; "
            "raise --target-flops or lower --w-min/--r-min")
    return box


CLIP_MARGIN = 0.9  # sample this far below the single-dimension budget level, to bracket it


def sampling_floors(box: dict, side: int, target: float, clip: bool) -> tuple[float, int]:
    """The width and side the sampling chains go down to. MACs fall about as ``w^2`` and
    ``r^2``, and depth or resolution cuts only raise the width a budgeted point can keep,
    so every point under the budget has ``w >= sqrt(target)`` (likewise ``r``); clipped, the
    chains stop at ``CLIP_MARGIN`` of that, inside the search box."""
    if not clip:
        return box["w_min"], box["side_min"]
    level = CLIP_MARGIN * target ** 0.5
    return max(box["w_min"], round(level, 4)), max(box["side_min"], min(side - 1, int(level * side)))


def _select(X: np.ndarray, y: np.ndarray, config: Prune3dConfig):
    """``select_predictor``, preferring monotone candidates when asked (falls back if none)."""
    if config.monotone:
        try:
            return select_predictor(X, y, seed=config.seed, monotone=True), True
        except LeanconvError as err:
            log.info("no monotone predictor (%s); choosing among all", err)
    return select_predictor(X, y, seed=config.seed), False


def fit_samples(samples: list[dict], macs0: float, config: Prune3dConfig) -> dict:
    """Fit the accuracy predictor and the MACs model on ``samples``; returns JSON-able parts
    and the fitted objects (``"selection"``, ``"cost"``)."""
    X = np.array([[s["d"], s["w"], s["r"]] for s in samples], dtype=np.float64)
    y = np.array([s["accuracy"] for s in samples], dtype=np.float64)
    macs = np.array([s["macs"] for s in samples], dtype=np.float64)
    selection, filtered = _select(X, y, config)
    holdout = None
    n_train = min(config.holdout_train, len(y) - 2)
    if n_train >= 3:
        h = compare_on_holdout(X, y, n_train, seed=config.seed)
        holdout = {"n_train": h.n_train, "n_test": h.n_test, "full_rmse": h.full_rmse, "lowrank_rmse": h.lowrank_rmse,
                   "lowrank_no_worse": h.lowrank_rmse <= h.full_rmse,
                   "full_model": h.full.model.to_dict(), "lowrank_model": h.lowrank.model.to_dict()}
    analytic = AnalyticCost(macs0)
    cost = CalibratedCost.fit(X, macs) if len(y) >= 4 else analytic
    fitted = selection.model.predict(X)
    return {
        "selection": selection, "cost": cost,
        "predictor": {**selection.to_dict(), "monotone_filter": filtered, "monotone": is_monotone(selection.model),
                      "train_rmse": float(np.sqrt(np.mean((fitted - y) ** 2)))},
        "holdout": holdout,
        "cost_model": {"calibrated": cost.to_dict() if isinstance(cost, CalibratedCost) else None,
                       "analytic_max_rel_error": float(np.max(np.abs(analytic(*X.T) / macs - 1.0)))},
    }


def budget_curve(predictor, cost, budget: float, bounds, d_values, r_values, points: int = 41) -> list[dict]:
    """Predicted accuracy along the budget boundary: for each allowed ``d`` and ``points``
    widths in ``bounds``, the largest allowed ``r`` within budget (rows with none are left out)."""
    (w_lo, w_hi), (r_lo, r_hi) = bounds[1], bounds[2]
    rs = np.array([r for r in r_values if r_lo - 1e-12 <= r <= r_hi + 1e-12])
    rows = []
    for d in d_values:
        for w in np.linspace(w_lo, w_hi, points):
            ok = rs[np.asarray(cost(d, w, rs)) <= budget]
            if len(ok):
                r = float(ok.max())
                acc = float(predictor.predict(np.array([[d, w, r]]))[0])
                rows.append({"d": float(d), "w": float(w), "r": r, "predicted_accuracy": acc,
                             "predicted_macs": float(cost(d, w, r))})
    return rows


# of the budget, tried in turn: the width engine lands within 2% of what it is asked, either side
FILL_AIMS = (0.995, 0.99, 0.985, 0.98, 0.975, 0.97)


def _fill_budget(origin: Origin, predictor: Any, built: dict, budget: float, d: float, w: float,
                 r: float) -> dict | None:
    """Spend the budget that whole block counts and integer sides leave unused on width.

    A choice under ``FILL_AIMS[0]`` of the budget is realised again with a wider ``w`` aimed
    just under the budget (MACs scale as ``w^2``), kept when its counted MACs fit and the
    predictor rates it no worse; ``built`` then holds the wider model. Returns what was done."""
    macs = built["point"].macs
    if macs >= FILL_AIMS[0] * budget or macs > budget or w >= 1:
        return None
    base = float(predictor.predict(np.array([[d, w, r]]))[0])
    for aim in FILL_AIMS:
        wider = min(1.0, w * math.sqrt(aim * budget / macs))
        if float(predictor.predict(np.array([[d, wider, r]]))[0]) < base:
            return None
        model, point = realise(origin, d, wider, r)
        if macs < point.macs <= budget:
            built["model"], built["point"] = model, point
            return {"w_solver": w, "w_filled": wider, "macs_before": macs, "macs_after": point.macs}
    return None


def _optimum(origin: Origin, fit: dict, budget: float, config: Prune3dConfig) -> tuple[Any, nn.Module, Any, dict]:
    """Maximise, realise, count, re-solve until the counted MACs meet the budget."""
    predictor, cost = fit["selection"].model, fit["cost"]
    n = len(origin.blocks)
    d_values = discrete_ratios(n, max(1, origin.min_keep)) if n else (1.0,)
    r_values = discrete_ratios(origin.side, min_side(origin, config.r_min))
    built: dict[str, Any] = {}

    def realise_fn(d: float, w: float, r: float) -> float:
        built["model"], built["point"] = realise(origin, d, w, r)
        built["fill"] = _fill_budget(origin, predictor, built, budget, d, w, r)
        return built["point"].macs

    options = {"allowed_d": d_values, "allowed_r": r_values, "grid": config.grid}
    result = resolve(predictor, cost, budget, realise_fn, **options)
    bounds = predictor.domain
    solver_budget = result.trail[-1]["solver_budget"]
    curve = budget_curve(predictor, cost, solver_budget, bounds, [d for d in d_values if d >= bounds[0][0] - 1e-12],
                         r_values)
    return result, built["model"], built["point"], {"curve": curve, "solver_budget": solver_budget,
                                                   "fill": built["fill"]}


def _finish(origin: Origin, model: nn.Module, config: Prune3dConfig, stage: Callable[[str], None]) -> dict:
    """Protocol-matched check on a copy, then the final fine-tune; validation accuracies."""
    check = copy.deepcopy(model)
    brief_finetune(check, origin.data, origin.settings)
    protocol = val_accuracy(check, origin.data)
    del check
    stage(f"fine-tuning the chosen model for {config.finetune_epochs} epochs")
    brief_finetune(model, origin.data, origin.settings, epochs=config.finetune_epochs, images=None)
    return {"val_protocol": protocol, "val_after_finetune": val_accuracy(model, origin.data)}


def _test_loader(origin: Origin, side: int):
    return origin.data.loader("test", 256, resolution=None if side == origin.data.image_size else side)


def run_prune3d(ckpt: str | Path, out_dir: str | Path, config: Prune3dConfig, *, executor: Any = None,
                data: str | None = None, data_dir: str | None = None, progress: Progress | None = None,
                stage: Callable[[str], None] | None = None) -> Prune3dResult:
    """Prune the checkpoint at ``ckpt`` in three dimensions (module docstring); writes
    ``out_dir``/samples.jsonl, model.safetensors and record.json. ``data`` defaults to the
    dataset the checkpoint records; ``executor`` to running the sample tasks in-process."""
    say, t0 = stage or (lambda text: None), time.perf_counter()
    meta = checkpoint.read_header(ckpt).get("meta", {}).get("dataset") or {}
    name = data or meta.get("name")
    if name is None:
        raise LeanconvError("the checkpoint records no dataset; pass the dataset name (--data)")
    origin = load_origin(str(ckpt), config.step_settings(name, data_dir if data_dir is not None else
                                                         (meta.get("data_dir") if name == meta.get("name") else None)))
    box = check_budget(origin, config)  # impossible budget: fails here, before any work
    budget = config.target * origin.macs
    w_floor, side_floor = sampling_floors(box, origin.side, config.target, config.clip_box)
    box.update(w_sampled_min=w_floor, side_sampled_min=side_floor)
    tasks = plan_tasks(config.samples, n_blocks=len(origin.blocks), min_keep=origin.min_keep, side=origin.side,
                       min_side=side_floor, w_min=w_floor, target=config.target, mixed=config.mixed)
    say(f"collecting {config.samples} samples ({len(tasks)} tasks)")
    out = Path(out_dir)
    samples = collect_samples(ckpt, origin.settings, tasks, SampleStore(out / "samples.jsonl"),
                              executor or LocalExecutor(0), progress)
    t_samples = time.perf_counter()
    say("fitting the accuracy predictor and the MACs model")
    fit = fit_samples(samples, origin.macs, config)
    say(f"maximising predicted accuracy under {config.target:g} of the MACs")
    result, model, point, curve = _optimum(origin, fit, budget, config)
    accuracy = _finish(origin, model, config, say)
    say("measuring")
    before = measure(origin.model, origin.shape, _test_loader(origin, origin.side), config.latency_repeats)
    after = measure(model, tuple(model.leanconv_meta["input_shape"]), _test_loader(origin, point.side),
                    config.latency_repeats)
    record = _record(origin, config, box, samples, fit, result, point, curve, accuracy, before, after)
    record["seconds"] = {"samples": t_samples - t0, "total": time.perf_counter() - t0,
                         "sampling_compute": sum(s["seconds"] for s in samples)}
    record["source"] = str(ckpt)
    model.leanconv_meta = {**model.leanconv_meta, "test": {"accuracy": after["test_accuracy"]},
                           "prune3d": {"target": config.target, "choice": record["choice"],
                                       "val_accuracy": accuracy["val_after_finetune"]}}
    checkpoint.save(model, out / "model.safetensors")
    write_json(out / "record.json", record)
    return Prune3dResult(model, record)


def _record(origin, config, box, samples, fit, result, point, curve, accuracy, before, after) -> dict:
    choice = result.choice
    return {
        "method": "prune3d", "config": asdict(config), "settings": asdict(origin.settings),
        "input_shape": list(origin.shape), "output_input_shape": [origin.shape[0], point.side, point.side],
        "budget": {"target": config.target, "macs0": origin.macs, "budget_macs": config.target * origin.macs},
        "search_box": box, "samples": samples,
        "predictor": fit["predictor"], "holdout": fit["holdout"], "cost_model": fit["cost_model"],
        "choice": {**choice.to_dict(), "realised": point.to_dict(), "counted_macs": result.counted_macs,
                   "within_budget": result.counted_macs <= config.target * origin.macs},
        "resolve_trail": list(result.trail), "budget_curve": curve["curve"], "fill": curve["fill"],
        "accuracy": {"predicted_val": choice.predicted_accuracy, "measured_val_protocol": accuracy["val_protocol"],
                     "val_after_finetune": accuracy["val_after_finetune"],
                     "test_before": before["test_accuracy"], "test_after": after["test_accuracy"]},
        "before": before, "after": after,
        "achieved": {"macs": after["macs"] / before["macs"], "params": after["params"] / before["params"]},
        "mac_reduction": before["macs"] / after["macs"],
        "speedup_batch1": before["latency_ms"]["batch1"]["median_ms"] / after["latency_ms"]["batch1"]["median_ms"],
        "speedup_batch64": before["latency_ms"]["batch64"]["median_ms"] / after["latency_ms"]["batch64"]["median_ms"],
        "finetune": {"epochs": config.finetune_epochs, "images": len(origin.data.train), "lr": config.lr},
    }
