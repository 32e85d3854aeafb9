"""Training, evaluation and fine-tuning: one loop, resumable, deterministic per seed.

``fit`` runs SGD with momentum and a cosine or step learning-rate schedule computed from the
global step (no scheduler state to save). Every epoch is reproducible on its own: the
loader shuffles and augments from a generator seeded by ``(seed, epoch)`` and the global RNG
is re-seeded at each epoch start, so a run resumed from the last completed epoch ends with
exactly the weights of an uninterrupted run.

With an output folder, after every epoch ``fit`` appends a line to ``metrics.jsonl`` and
atomically rewrites ``model.safetensors`` (the model) and ``train_state.safetensors`` (the
model plus optimiser momentum and the epoch reached). A non-finite loss stops the run with
a :class:`~leanconv.errors.LeanconvError`; the files of the last good epoch stay as they were.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from leanconv import checkpoint
from leanconv.errors import LeanconvError

__all__ = ["TrainConfig", "TrainResult", "fit", "evaluate", "recalibrate_bn", "learning_rate"]

log = logging.getLogger(__name__)
Progress = Callable[[int, int, dict], None]


class Loader(Protocol):
    def __len__(self) -> int: ...
    def epoch(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training or fine-tuning run."""

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the CIFAR-ResNet default; applied to every parameter
    nesterov: bool = True
    schedule: str = "cosine"  # "cosine" (per step, to 0) or "step" (x0.1 at each milestone)
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the run, for "step"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    channels_last: bool = True  # oneDNN convs are faster in NHWC on CPU
    threads: int | None = None  # None: PyTorch's default

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise LeanconvError(f"--epochs must be a positive whole number, got {self.epochs}")
        if self.lr <= 0:
            raise LeanconvError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in ("cosine", "step"):
            raise LeanconvError(f"unknown schedule {self.schedule!r}; use cosine or step")


@dataclass
class TrainResult:
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at global ``step`` of ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * step / max(1, total_steps)))
    passed = sum(step >= m * total_steps for m in config.milestones)
    return config.lr * (0.1**passed)


def _prepare(model: nn.Module, config: TrainConfig) -> nn.Module:
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_input(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, channels_last: bool = True) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (in %) of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader.epoch(0):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        total_loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise LeanconvError("evaluation data is empty")
    return {"loss": total_loss / count, "accuracy": 100.0 * correct / count, "n": count}


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0)


def _optimizer_tensors(model: nn.Module, opt: torch.optim.SGD) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(model.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"momentum.{i}"] = buf
    return out


def _restore_optimizer(model: nn.Module, opt: torch.optim.SGD, tensors: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(model.parameters()):
        buf = tensors.get(f"momentum.{i}")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(p.dtype).contiguous(memory_format=_format_of(p))


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _train_epoch(model, loader, opt, config, epoch, step0, total_steps, progress) -> dict[str, float]:
    model.train()
    torch.manual_seed(config.seed * 100_003 + epoch)
    loss_sum, correct, count, step = 0.0, 0, 0, step0
    for x, y in loader.epoch(epoch):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step, total_steps)
        out = model(_to_input(x, config))
        loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
        value = loss.item()
        if not math.isfinite(value):
            raise LeanconvError(
                f"training diverged at epoch {epoch + 1}, step {step - step0 + 1} (loss={value}); the last good "
                "checkpoint is kept; lower --lr or check the data"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_sum += value * y.numel()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
        if progress:
            progress(step, total_steps, {"epoch": epoch + 1, "loss": loss_sum / count, "acc": 100.0 * correct / count})
    return {"train_loss": loss_sum / max(1, count), "train_accuracy": 100.0 * correct / max(1, count)}


def _resume_point(model: nn.Module, opt, out_dir: Path, config: TrainConfig) -> tuple[nn.Module, int]:
    state_path = out_dir / "train_state.safetensors"
    if not state_path.exists():
        return model, 0
    saved, extra = checkpoint.load(state_path, with_extra=True)
    saved_cfg = saved.leanconv_meta.get("train_config", {})
    mine = json.loads(json.dumps(asdict(config)))
    if {k: v for k, v in saved_cfg.items() if k != "threads"} != {k: v for k, v in mine.items() if k != "threads"}:
        raise LeanconvError(f"cannot resume: {out_dir} was started with a different training config; use a new --out")
    model.load_state_dict(saved.state_dict())
    _restore_optimizer(model, opt, extra)
    return model, int(saved.leanconv_meta.get("epochs_done", 0))


def _save_epoch(model, opt, out_dir: Path, config: TrainConfig, epoch: int, row: dict) -> None:
    meta = dict(getattr(model, "leanconv_meta", {}))
    meta.update({"train_config": json.loads(json.dumps(asdict(config))), "epochs_done": epoch + 1, "train": row})
    model.leanconv_meta = meta
    checkpoint.save(model, out_dir / "train_state.safetensors", extra_tensors=_optimizer_tensors(model, opt))
    checkpoint.save(model, out_dir / "model.safetensors")
    with open(out_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def fit(model: nn.Module, train_loader: Loader, config: TrainConfig, *, val_loader: Loader | None = None,
        out_dir: str | Path | None = None, resume: bool = False, progress: Progress | None = None) -> TrainResult:
    """Train ``model`` in place for ``config.epochs`` epochs; see the module docstring."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    model = _prepare(model, config)
    opt = _optimizer(model, config)
    start = 0
    if out is not None and resume:
        model, start = _resume_point(model, opt, out, config)
    elif out is not None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "train_state.safetensors").unlink(missing_ok=True)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * config.epochs
    result, t0 = TrainResult(epochs_run=0), time.perf_counter()
    for epoch in range(start, config.epochs):
        e0 = time.perf_counter()
        row = {"epoch": epoch + 1, **_train_epoch(model, train_loader, opt, config, epoch,
                                                  epoch * steps_per_epoch, total, progress)}
        if val_loader is not None:
            metrics = evaluate(model, val_loader, config.channels_last)
            row.update({"val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]})
        row["seconds"] = time.perf_counter() - e0
        row["lr_end"] = learning_rate(config, (epoch + 1) * steps_per_epoch - 1, total)
        log.info("epoch %d: %s", epoch + 1, row)
        result.history.append(row)
        result.epochs_run += 1
        if out is not None:
            _save_epoch(model, opt, out, config, epoch, row)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Loader, max_batches: int = 50, channels_last: bool = True) -> int:
    """Re-estimate BatchNorm running statistics on ``loader`` (cumulative average over at most
    ``max_batches`` batches, weights untouched). Returns the number of BN layers reset."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved_momentum = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(loader.epoch(0)):
        if i >= max_batches:
            break
        model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    for m, mom in zip(bns, saved_momentum):
        m.momentum = mom
    model.train(was_training)
    return len(bns)
