"""Training, evaluation and fine-tuning: one loop, resumable, deterministic per seed.

``fit`` runs SGD with momentum and a cosine or step learning-rate schedule computed from the
global step (no scheduler state to save). Every epoch is reproducible on its own: the
loader shuffles and augments from a generator seeded by ``(seed, epoch)`` and the global RNG
is re-seeded at each epoch start, so a run resumed from the last completed epoch ends with
exactly the weights of an uninterrupted run.

With an output folder, after every epoch ``fit`` writes one file set
(:func:`~leanconv.util.fileset.write_together`): ``model.safetensors`` (the model),
``train_state.safetensors`` (the model plus optimiser momentum and the epoch reached),
``metrics.jsonl`` (a line per epoch so far) and the caller's ``extra_files``. A kill at any
moment leaves the set of the last finished epoch, whole. A fresh run in a folder that holds an
older one replaces that set at its first epoch; nothing is written before the first epoch
ends. A non-finite loss stops the run with a :class:`~leanconv.errors.LeanconvError`; the
files of the last good epoch stay as they were.

The objective is cross-entropy unless the caller gives a ``loss`` (:class:`Loss`: the
distillation of :mod:`leanconv.train.distill`, the group lasso of
:mod:`leanconv.train.regularize`), called on every batch with the model's output, the batch and
its labels. A loss that can ``describe()`` itself is recorded with every epoch, and resuming
with another one is refused.

Under ``torchrun`` (a process group joined with :func:`leanconv.train.distributed.init_from_env`)
``fit`` trains data-parallel: the model is wrapped in ``DistributedDataParallel`` (gradients
averaged over the processes; the optimiser steps on the plain module, which is what gets
saved), every process iterates its own shard of the training data (the caller builds the
loader with ``rank``/``world_size``), loss/accuracy sums and counts are added up over the
processes, BatchNorm running statistics are taken from rank 0 at the end of every epoch
(plain per-process BatchNorm, as DDP's ``broadcast_buffers`` does; ``sync_bn`` for
SyncBatchNorm on GPUs), validation is split by batches and summed, and only rank 0 writes
files while the others wait at a barrier. Results are reproducible per (seed, epoch, number
of processes); resuming with another number of processes is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leanconv import checkpoint
from leanconv.train import distributed as dist
from leanconv.errors import LeanconvError
from leanconv.util.checks import number, whole
from leanconv.util.files import JsonlStore, write_json
from leanconv.util.fileset import write_together
from leanconv.util.limits import MAX_EPOCHS, MAX_LR, MAX_THREADS, SEED_MAX
from leanconv.util.model_io import model_device, to_model
from leanconv.util.progress import Progress

__all__ = ["Loader", "Loss", "TrainConfig", "TrainResult", "fit", "evaluate", "learning_rate", "check_loader",
           "channels_last_crashes"]

MAX_STEPS_TOTAL = 10**9  # warm-up steps

log = logging.getLogger(__name__)


class Loader(Protocol):
    def __len__(self) -> int: ...
    def epoch(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


class Loss(Protocol):
    """A training objective in place of cross-entropy: ``loss(out, x, y)`` is the batch's mean
    loss, given the model's output ``out`` on the images ``x`` (on the model's device and in
    its dtype and memory format) with labels ``y``. It must draw no random numbers, so that
    runs stay reproducible per seed. ``describe()``, where a loss has it, returns its settings
    as plain JSON values (recorded with every epoch and compared on resume)."""

    def __call__(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


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
    sync_bn: bool = False  # SyncBatchNorm across processes under torchrun (GPUs only); else BN per process

    def __post_init__(self) -> None:
        """The ranges of ``leanconv.util.limits``, for a library caller as for the command line."""
        whole(self.epochs, "--epochs", at_least=1, at_most=MAX_EPOCHS)
        number(self.lr, "--lr", above=0, at_most=MAX_LR)
        number(self.momentum, "--momentum", at_least=0, below=1)
        number(self.weight_decay, "--weight-decay", at_least=0, at_most=MAX_LR)
        whole(self.seed, "--seed", at_least=0, at_most=SEED_MAX)
        whole(self.warmup_steps, "warmup_steps", at_least=0, at_most=MAX_STEPS_TOTAL)
        number(self.label_smoothing, "label_smoothing", at_least=0, below=1)
        if self.threads is not None:
            whole(self.threads, "--threads", at_least=1, at_most=MAX_THREADS)
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


def _prepare(model: nn.Module, config: TrainConfig, ddp: bool = False) -> nn.Module:
    if config.threads:
        torch.set_num_threads(config.threads)
    if ddp:
        model = model.to(dist.device())
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def channels_last_crashes(model: nn.Module) -> bool:
    """Whether training ``model`` in channels_last would hit a oneDNN fault of torch 2.13 on CPU:
    the backward of a 1x1 conv with stride above 1 and 2 to 7 input channels per group aborts,
    hangs or corrupts memory in channels_last (measured on this CPU, also with
    ``ATEN_CPU_CAPABILITY=default``; 1 or 8+ channels, stride 1, and a 3x3 kernel are fine; NCHW is
    fine). Pruned ResNet shortcuts reach such counts; :func:`fit` then trains in NCHW."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
               and 2 <= m.in_channels // m.groups <= 7 for m in model.modules())


def _to_input(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, channels_last: bool = True, *,
             distributed: bool = False) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (in %) of ``model`` over ``loader``.

    With ``distributed=True`` every process of the group must call it with the same model and
    loader: process ``r`` evaluates batches ``r, r + world_size, ...`` and the sums are added
    up, so the result equals a single-process evaluation (the loss up to summation order).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    share, part = (dist.world_size(), dist.rank()) if distributed else (1, 0)
    total_loss, correct, count = 0.0, 0, 0
    for i, (x, y) in enumerate(loader.epoch(0)):
        if i % share != part:
            continue
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, y = to_model(x, model), y.to(device)  # a float64 model gets float64 images
        out = model(x)
        total_loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    if distributed:
        total_loss, correct, count = dist.all_reduce_sum([total_loss, correct, count])
        count = int(count)
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
            opt.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype).contiguous(memory_format=_format_of(p))


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _check_finite(value: float, ddp: bool, epoch: int, step: int, config: "TrainConfig") -> None:
    """Stop on a NaN/inf loss; under DDP every process stops together when any one sees it."""
    bad = not math.isfinite(value)
    if ddp:
        bad = dist.all_reduce_sum([float(bad)])[0] > 0
    if bad:
        raise LeanconvError(
            f"training diverged at epoch {epoch + 1}, step {step} (loss={value}, learning rate {config.lr:g}); "
            "nothing from this epoch was written; lower the learning rate or check the data"
        )


def _check_epoch_finite(model: nn.Module, row: dict, config: "TrainConfig", epoch: int) -> None:
    """After an epoch, before anything is written: every weight and statistic and the validation
    loss must be finite (the last step's update can break the weights after the last loss check)."""
    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    if all(bool(torch.isfinite(t).all()) for t in state) and math.isfinite(row.get("val_loss", 0.0)):
        return
    raise LeanconvError(f"training diverged in epoch {epoch + 1}: the weights or the validation loss are no longer "
                        f"finite (learning rate {config.lr:g}, weight decay {config.weight_decay:g}); nothing from "
                        "this epoch was written; lower the learning rate or check the data")


def _train_epoch(net, loader, opt, config, epoch, step0, total_steps, progress, ddp=False,
                 loss_fn: Loss | None = None) -> dict[str, float]:
    net.train()
    torch.manual_seed(config.seed * 100_003 + epoch)
    device = model_device(net)
    loss_sum, correct, count, step = 0.0, 0, 0, step0
    for x, y in loader.epoch(epoch):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step, total_steps)
        x, y = to_model(_to_input(x, config), net), y.to(device)
        out = net(x)
        if loss_fn is None:
            loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
        else:
            loss = loss_fn(out, x, y)
        value = loss.item()
        _check_finite(value, ddp, epoch, step - step0 + 1, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_sum += value * y.numel()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
        if progress:  # running values of this process only
            progress(step, total_steps, {"epoch": epoch + 1, "loss": loss_sum / count, "acc": 100.0 * correct / count})
    if ddp:
        loss_sum, correct, count = dist.all_reduce_sum([loss_sum, correct, count])
    return {"train_loss": loss_sum / max(1, count), "train_accuracy": 100.0 * correct / max(1, count)}


def _same_config(saved: dict, mine: dict) -> bool:
    """Compare two saved training configs, ignoring ``threads``; a key that an older version
    did not save counts as its default."""
    defaults = json.loads(json.dumps(asdict(TrainConfig())))
    saved = {**defaults, **saved}
    return {k: v for k, v in saved.items() if k != "threads"} == {k: v for k, v in mine.items() if k != "threads"}


def _loss_settings(loss_fn: Loss | None) -> Any:
    """What the metadata records of a caller's loss: None for cross-entropy."""
    if loss_fn is None:
        return None
    describe = getattr(loss_fn, "describe", None)
    return json.loads(json.dumps(describe())) if callable(describe) else type(loss_fn).__name__


def _resume_point(model: nn.Module, opt, out_dir: Path, config: TrainConfig, world: int,
                  loss_fn: Loss | None = None) -> tuple[nn.Module, int]:
    state_path = out_dir / "train_state.safetensors"
    if not state_path.exists():
        return model, 0
    saved, extra = checkpoint.load(state_path, with_extra=True)
    if not _same_config(saved.leanconv_meta.get("train_config", {}), json.loads(json.dumps(asdict(config)))):
        raise LeanconvError(f"cannot resume: {out_dir} was started with a different training config; use a new --out")
    if saved.leanconv_meta.get("train_loss") != _loss_settings(loss_fn):
        raise LeanconvError(f"cannot resume: {out_dir} was started with another loss "
                            f"({saved.leanconv_meta.get('train_loss') or 'cross-entropy'}); use a new --out")
    saved_world = int(saved.leanconv_meta.get("world_size", 1))
    if saved_world != world:
        raise LeanconvError(f"cannot resume: {out_dir} was trained by {saved_world} process(es), this run has "
                            f"{world}; relaunch with torchrun --nproc_per_node {saved_world} (or use a new --out)")
    model.load_state_dict(saved.state_dict())
    _restore_optimizer(model, opt, extra)
    return model, int(saved.leanconv_meta.get("epochs_done", 0))


def _save_epoch(model, opt, out_dir: Path, config: TrainConfig, epoch: int, rows: list[dict], *, world: int = 1,
                write: bool = True, extra_files: dict[str, Any] | None = None, loss: Any = None) -> None:
    """Record the epoch in ``model.leanconv_meta`` (every process) and write the epoch's file
    set (``write``): both checkpoints, every metrics row so far and ``extra_files``."""
    meta = dict(getattr(model, "leanconv_meta", {}))
    meta.update({"train_config": json.loads(json.dumps(asdict(config))), "epochs_done": epoch + 1, "train": rows[-1],
                 "world_size": world})
    meta.pop("train_loss", None)  # the settings of a caller's loss; cross-entropy records none (as before)
    if loss is not None:
        meta["train_loss"] = loss
    model.leanconv_meta = meta
    if not write:
        return
    state = _optimizer_tensors(model, opt)
    writers = {"train_state.safetensors": lambda p: checkpoint.save(model, p, extra_tensors=state),
               "model.safetensors": lambda p: checkpoint.save(model, p),
               "metrics.jsonl": lambda p: JsonlStore(p).append(rows)}
    for name, obj in (extra_files or {}).items():
        writers[name] = lambda p, obj=obj: write_json(p, obj)
    write_together(out_dir, writers)


def _metrics_so_far(out_dir: Path, start: int) -> list[dict]:
    """The metrics rows of the epochs a resumed run keeps (epochs 1..start)."""
    rows = JsonlStore(out_dir / "metrics.jsonl").read()
    return [r for r in rows if isinstance(r.get("epoch"), int) and r["epoch"] <= start]


def _use_ddp(distributed: bool | None) -> bool:
    if distributed is None:
        return dist.is_distributed()
    if distributed and not dist.is_initialized():
        raise LeanconvError("distributed training needs a process group; launch with torchrun "
                            "(see docs/distributed.md)")
    return bool(distributed)


def _wrap(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (with SyncBatchNorm layers when ``config.sync_bn``)."""
    device = dist.device()
    net = model
    if config.sync_bn:
        if device.type != "cuda":
            raise LeanconvError("SyncBatchNorm (--sync-bn) runs on GPUs only; drop it on the CPU")
        net = dist.sync_batchnorm_view(model)
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def _epoch(net, model, loaders, opt, config, epoch, total, progress, ddp, loss_fn: Loss | None = None) -> dict:
    """Train one epoch, then (optionally) validate; the row for ``metrics.jsonl``."""
    train_loader, val_loader = loaders
    e0, steps = time.perf_counter(), len(train_loader)
    row = {"epoch": epoch + 1, **_train_epoch(net, train_loader, opt, config, epoch, epoch * steps, total,
                                              progress, ddp, loss_fn)}
    if ddp:
        dist.broadcast_buffers(model)  # BatchNorm statistics of rank 0 everywhere: identical models
    if val_loader is not None:
        metrics = evaluate(model, val_loader, config.channels_last, distributed=ddp)
        row.update({"val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]})
    row["seconds"] = time.perf_counter() - e0
    row["lr_end"] = learning_rate(config, (epoch + 1) * steps - 1, total)
    return row


def check_loader(train_loader: Loader) -> None:
    """Raise :class:`LeanconvError` when the training loader yields no full batch."""
    if len(train_loader) == 0:
        raise LeanconvError("the training data holds less than one full batch (the last partial batch is dropped); "
                            "lower --batch-size or use more images")


def fit(model: nn.Module, train_loader: Loader, config: TrainConfig, *, val_loader: Loader | None = None,
        out_dir: str | Path | None = None, resume: bool = False, progress: Progress | None = None,
        distributed: bool | None = None, extra_files: dict[str, Any] | None = None,
        loss: Loss | None = None) -> TrainResult:
    """Train ``model`` in place for ``config.epochs`` epochs; see the module docstring.

    ``extra_files`` (name -> JSON object) are written with every epoch's files in ``out_dir``.
    ``loss`` replaces cross-entropy (and ``config.label_smoothing``) as the objective (:class:`Loss`).
    ``distributed``: None (default) trains data-parallel exactly when this process belongs to a
    process group of two or more; every process of the group must then call ``fit``.
    """
    ddp = _use_ddp(distributed)
    check_loader(train_loader)
    if config.channels_last and channels_last_crashes(model):
        log.info("training in NCHW: a strided 1x1 conv with 2-7 input channels crashes in channels_last (oneDNN)")
        config = replace(config, channels_last=False)
    world, writer = (dist.world_size(), dist.is_main()) if ddp else (1, True)
    out = Path(out_dir) if out_dir is not None else None
    home = model_device(model)
    model = _prepare(model, config, ddp)
    opt = _optimizer(model, config)
    start, rows = 0, []
    if out is not None and resume:
        model, start = _resume_point(model, opt, out, config, world, loss)
        rows = _metrics_so_far(out, start)
    if ddp and not dist.all_equal(len(train_loader)):
        raise LeanconvError("the processes have different numbers of training batches; shard the loader "
                            "with rank/world_size and drop_last=True")
    net = _wrap(model, config) if ddp else model
    total = len(train_loader) * config.epochs
    result, t0 = TrainResult(epochs_run=0), time.perf_counter()
    for epoch in range(start, config.epochs):
        row = _epoch(net, model, (train_loader, val_loader), opt, config, epoch, total, progress, ddp, loss)
        _check_epoch_finite(model, row, config, epoch)
        if writer:
            log.info("epoch %d: %s", epoch + 1, row)
        result.history.append(row)
        result.epochs_run += 1
        rows.append(row)
        if out is not None:
            _save_epoch(model, opt, out, config, epoch, rows, world=world, write=writer, extra_files=extra_files,
                        loss=_loss_settings(loss))
            if ddp:
                dist.barrier()
    model.eval()
    if model_device(model) != home:
        model.to(home)
    result.seconds = time.perf_counter() - t0
    return result
