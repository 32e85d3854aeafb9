"""The shape of every run's settings: a frozen dataclass whose fields know their option.

A run config (``PruneConfig``, ``Prune3dConfig``, ``ConvertConfig``, ``SensitivityConfig``,
``CompareConfig``) subclasses :class:`RunConfig` and declares its fields with
:func:`setting`, or with the shared factories below for the settings several runs have
(the same name everywhere: ``finetune_epochs``, ``finetune_lr``, ``train_subset``,
``score_images``, ``probes``, ``seed``, ...). A field's metadata holds

* ``flag``: its command-line option (``--probes``); the CLI builds its options from it
  (:func:`leanconv.cli.common.add_config_options`) and :meth:`RunConfig.argv` turns a config
  back into them, so that :func:`command_line` writes the one command that reproduces a run;
* ``check``: how the value is checked, once, when the config is built (a bad value is one
  :class:`~leanconv.errors.LeanconvError` naming the option);
* ``help``, ``metavar``, ``choices``, ``aliases`` for ``--help``.

Every numeric setting of every run config also has its range in :data:`RANGES`, by field name
(the bounds are :mod:`leanconv.util.limits`'): a value above it is refused before its field's
own check, so that a setting has one range in every run and through the library API alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import shlex
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from leanconv.errors import LeanconvError
from leanconv.importance.hessian import ESTIMATORS
from leanconv.util import checks
from leanconv.util.limits import (MAX_BATCH, MAX_BLOCKS, MAX_EPOCHS, MAX_GRID, MAX_GROUPS, MAX_IMAGES, MAX_LIST,
                                  MAX_LR, MAX_PROBES, MAX_REL_STDERR, MAX_REPEATS, MAX_SAMPLES, MAX_STEPS,
                                  MAX_TEMPERATURE, MAX_THREADS, SEED_MAX)

if TYPE_CHECKING:
    from pathlib import Path

    from leanconv.runs.source import Source

__all__ = [
    "RunConfig", "setting", "command_line", "reproducing_command", "RANGES",
    "target", "finetune_epochs", "finetune_lr", "train_subset", "score_images", "probes", "seed", "batch_size",
    "latency_repeats", "runtime", "threads", "latency_batch", "latency_table",
]

Check = Callable[[Any, str], Any]
log = logging.getLogger(__name__)


def setting(default: Any, flag: str | Callable[[Any], str] | None = None, *, check: Check | None = None,
            help: str = "", always: bool = False, parse: Callable[[str], Any] | None = None,
            expects: str = "", metavar: str | None = None, choices: Callable[[], list] | tuple | None = None,
            aliases: tuple[str, ...] = (), cli: bool = True, implied: bool = False) -> Any:
    """A config field. ``flag`` is its option (a function of the config where the option
    depends on another field); ``always`` writes it into reproducing commands even at its
    default (the settings that define a run); ``parse`` turns the option's text into a value
    (syntax only: ranges are ``check``'s; ``expects`` says what it takes); ``cli=False``
    leaves it to the command to declare the option itself; ``implied`` marks a field without an
    option of its own that another field's option carries (a budget's kind in ``--target-flops``)."""
    meta = {"flag": flag, "check": check, "help": help, "always": always, "parse": parse, "expects": expects,
            "metavar": metavar, "choices": choices, "aliases": aliases, "cli": cli, "implied": implied}
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- checks


def _fraction(value: Any, name: str) -> float:
    return checks.fraction(value, name)


def _at_least(low: int, why: str = "") -> Check:
    return lambda value, name: checks.whole(value, name, at_least=low, why=why)


def _optional(check: Check) -> Check:
    return lambda value, name: value if value is None else check(value, name)


def _positive_number(value: Any, name: str) -> float:
    return checks.number(value, name, above=0)


# ---------------------------------------------------------------- the settings several runs share


def target(default: float = 0.5) -> Any:
    """The budget: the share of the original MACs (= FLOPs ratio) to keep."""
    return setting(default, "--target-flops", check=_fraction, always=True, metavar="R",
                   help="keep this fraction of the FLOPs/MACs")


def finetune_epochs(default: int, help: str = "fine-tuning epochs of the result") -> Any:
    return setting(default, "--finetune-epochs", check=_at_least(0), always=True, metavar="N", help=help)


def finetune_lr(default: float = 0.01, aliases: tuple[str, ...] = (),
                help: str = "fine-tuning learning rate (cosine from it)") -> Any:
    return setting(default, "--finetune-lr", check=_positive_number, always=True, metavar="LR", aliases=aliases,
                   help=help)


def train_subset(aliases: tuple[str, ...] = (),
                 help: str = "fine-tune on the first N training images only (quick runs; default: all)") -> Any:
    return setting(None, "--train-subset", check=_optional(_at_least(1)), metavar="N", aliases=aliases, help=help)


def score_images(default: int = 512, aliases: tuple[str, ...] = ()) -> Any:
    return setting(default, "--score-images", check=_at_least(1), always=True, metavar="N", aliases=aliases,
                   help="validation images for scoring (never the test split)")


def probes(default: int) -> Any:
    """The cap on Hutchinson probes of HAP's Hessian traces (at least 2: a standard error needs two)."""
    return setting(default, "--probes", check=_at_least(2, " (a standard error needs two)"), always=True,
                   metavar="N", help="cap on Hutchinson probes for hap")


def hessian(default: str, where: str = "") -> Any:
    """How HAP's curvature is estimated (:data:`leanconv.importance.hessian.ESTIMATORS`);
    ``where`` ends the help (what it applies to)."""
    return setting(default, "--hessian", check=lambda v, n: checks.one_of(v, n, ESTIMATORS), choices=ESTIMATORS,
                   help="how the curvature is estimated: hutchinson = random probes (the paper's), hutch++ = "
                   "probes with a sketched low-rank part taken exactly, gauss-newton = the exact Gauss-Newton "
                   "blocks from per-image Jacobians (equal to the Hessian's for ReLU networks; no probe noise, "
                   f"cross-entropy only){where}")


def seed() -> Any:
    return setting(0, "--seed", check=_at_least(0), always=True, help=f"random seed, 0 to {SEED_MAX}")


def batch_size() -> Any:
    return setting(128, "--batch-size", check=_at_least(1), metavar="N", help="images per batch")


def latency_repeats(default: int = 10) -> Any:
    return setting(default, "--repeats", check=_at_least(1), metavar="N", help="timed runs per latency figure")


def _runtime(value: Any, name: str) -> str:
    from leanconv.cost.runtimes import RUNTIMES, check_runtime

    checks.one_of(value, name, RUNTIMES)
    return check_runtime(value)  # installed, or one line saying how to install it


def runtime() -> Any:
    """The runtime every latency of a run is measured on (``leanconv.cost.runtimes``)."""
    from leanconv.cost.runtimes import DEFAULT_RUNTIME, RUNTIMES

    return setting(DEFAULT_RUNTIME, "--runtime", check=_runtime, always=True, choices=RUNTIMES,
                   help="where latency is measured and budgeted: onnxruntime (CPU), torch (eager, BatchNorm folded, "
                   "channels_last) or openvino (CPU; the optional extra)")


def threads() -> Any:
    return setting(1, "--threads", check=_at_least(1), metavar="T",
                   help="intra-op threads of the runtime when timing (default 1)")


def latency_batch() -> Any:
    return setting(1, "--batch", check=_at_least(1), metavar="B",
                   help="batch size a latency target holds for (default 1); records also time batches 1 and 64")


def _table_path(value: Any, name: str) -> Any:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise LeanconvError(f"{name} must name a file, got {checks.brief(value)}")
    return value


def latency_table() -> Any:
    return setting(None, "--latency-table", check=_table_path, metavar="FILE",
                   help="a latency table from 'leanconv latency-table' (e.g. built on the deployment device) "
                   "instead of this machine's cached one")


# ---------------------------------------------------------------- the range of every numeric setting

# field name -> (lowest, highest) of every numeric setting of every run config (a float range
# excludes its lowest); the field's own check refuses values below (with its reason), wrong types
# and what depends on other fields. Fractions (budgets, overlaps) are checked by their fields.
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, SEED_MAX),
    "finetune_epochs": (0, MAX_EPOCHS), "sample_epochs": (0, MAX_EPOCHS),
    "finetune_lr": (0.0, MAX_LR),
    "train_subset": (1, MAX_IMAGES), "score_images": (1, MAX_IMAGES), "sample_images": (1, MAX_IMAGES),
    "fit_images": (1, MAX_IMAGES), "reconstruct_images": (0, MAX_IMAGES),
    "probes": (2, MAX_PROBES), "min_probes": (2, MAX_PROBES), "rel_stderr": (0.0, MAX_REL_STDERR),
    "batch_size": (1, MAX_BATCH), "latency_repeats": (1, MAX_REPEATS), "latency_batch": (1, MAX_BATCH),
    "threads": (1, MAX_THREADS), "runtime_threads": (1, MAX_THREADS), "candidates": (1, 1000),
    "steps": (1, MAX_STEPS), "samples": (4, MAX_SAMPLES), "mixed": (0, MAX_SAMPLES), "holdout_train": (3, MAX_SAMPLES),
    "grid": (2, MAX_GRID), "min_blocks_per_stage": (1, MAX_BLOCKS),
    "groups": (1, MAX_GROUPS), "scc_groups": (1, MAX_GROUPS), "round_to": (1, MAX_GROUPS),
    "probe_groups": (1, MAX_GROUPS),
    "distill_temperature": (0.0, MAX_TEMPERATURE), "regularize_epochs": (0, MAX_EPOCHS),
    "regularize_strength": (0.0, MAX_LR),
}


def _check_range(value: Any, name: str, bounds: tuple[float, float] | None) -> None:
    """Refuse a list of more than ``MAX_LIST`` values, and a number above its range (a number
    written as digits, as ``--probe-groups`` takes it, too: before anything converts it)."""
    if isinstance(value, (tuple, list)):
        if len(value) > MAX_LIST:
            raise LeanconvError(f"{name} takes at most {MAX_LIST} values, got {len(value)}")
        return
    if bounds is None:
        return
    low, high = bounds
    if isinstance(value, str) and value.isdecimal():
        too_big = len(value) > len(str(int(high))) or int(value) > high
    else:
        too_big = isinstance(value, numbers.Real) and not isinstance(value, bool) and value > high
    if too_big and isinstance(high, float):
        raise LeanconvError(f"{name} must be a finite number {checks.bounds(above=low, at_most=high)}, got "
                            f"{checks.brief(value)}")
    if too_big:
        raise LeanconvError(f"{name} must be a whole number in [{low}, {high}], got {checks.brief(value)}")


# ---------------------------------------------------------------- the base class


@dataclass(frozen=True)
class RunConfig:
    """Base of every run config: checks its fields when built, turns itself into CLI options."""

    command: ClassVar[str] = ""  # the leanconv subcommand that runs this config

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_range(getattr(self, f.name), option_name(f, self), RANGES.get(f.name))
            check = f.metadata.get("check")
            if check is not None:
                check(getattr(self, f.name), option_name(f, self))
        self.check()

    def check(self) -> None:
        """Checks that involve several fields (override; called after the per-field checks)."""

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def argv(self) -> list[str]:
        """The command-line options that rebuild this config (the inverse of the CLI's parsing)."""
        out: list[str] = []
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            default = f.default if f.default is not MISSING else None
            if meta.get("flag") is None:
                if value != default and not meta.get("implied"):
                    raise LeanconvError(f"{type(self).__name__}.{f.name}={value!r} has no command-line option; "
                                        "such a run cannot be reproduced by a command")
                continue
            flag = option_name(f, self)
            if isinstance(value, bool):
                if value != default:
                    out.append(flag)
            elif value is None:
                if default is not None:
                    raise LeanconvError(f"{flag} cannot be given as 'none' on the command line")
            elif value != default or meta.get("always"):
                out += [flag, _text(value)]
        return out


def option_name(f: dataclasses.Field, config: Any = None) -> str:
    """The option a field is set by (its name in messages), or the field's own name."""
    flag = f.metadata.get("flag")
    if callable(flag):
        return flag(config) if config is not None else f.name
    return flag or f.name


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def command_line(config: RunConfig, source: Source, out: str | Path) -> str:
    """The one command that reproduces a run of ``config`` on ``source`` into ``out``."""
    return shlex.join(["leanconv", config.command, *source.argv(), *config.argv(), "--out", str(out)])


def reproducing_command(config: RunConfig, source: Source, out: str | Path | None) -> str | None:
    """:func:`command_line`, or None (logged) where the run cannot be written as a command: no
    output folder, a model given in memory, a setting without an option. A finished run's
    record carries it; it never fails the run."""
    if out is None or not source.writable():
        return None
    try:
        return command_line(config, source, out)
    except LeanconvError as exc:
        log.info("no reproducing command: %s", exc)
        return None
