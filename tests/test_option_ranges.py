"""Every numeric option has a range (issue 18, item 6): explicit cases, one or more per family.

Each value lies outside its option's range (:mod:`leanconv.util.limits`) and must be refused
before any work in one line that names the option and its range. Before the ranges, each of
these crashed with a traceback, started work (a trip wire stands in for it), exited with the
file-system status 1, or was refused without naming the option.
"""

from __future__ import annotations

import pytest

from leanconv.data import load_dataset
from leanconv.errors import LeanconvError
from leanconv.runs.prune import PruneConfig
from leanconv.runs.prune3d import Prune3dConfig
from leanconv.runs.sensitivity import SensitivityConfig
from leanconv.train import TrainConfig
from test_argument_fuzz import Tripwire, bases, render, run_case, tripwires, world  # noqa: F401 (fixtures)

HUGE = "1000000000000"
MANY = ",".join(f"0.{i:04d}1" for i in range(1, 1001))  # 1,000 distinct budgets

# (command, extra options, text the one error line must hold)
CASES = {
    "seed-huge": ("train", ["--seed=99999999999999999999"],
        "argument --seed: must be a whole number in [0, 4294967295]"),
    "seed-negative": ("explore", ["--seed=-1"], "argument --seed: must be a whole number in [0, 4294967295]"),
    "resolution": ("train", ["--resolution=100000"], "argument --resolution: must be a whole number in [1, 1024]"),
    "shape-channels": ("profile", ["--input-shape=300,16,16"],
        "argument --input-shape: input shape C,H,W needs C in [1, 256]"),
    "shape-side": ("eval", ["--input-shape=3,2048,2048"], "H and W in [1, 1024]"),
    "classes": ("profile", [f"--num-classes={HUGE}"], "argument --num-classes: must be a whole number in [1, 100000]"),
    "classes-import": ("import", [f"--num-classes={HUGE}"],
        "argument --num-classes: must be a whole number in [1, 100000]"),
    "batch-eval": ("eval", [f"--batch-size={HUGE}"], "argument --batch-size: must be a whole number in [1, 65536]"),
    "batch-prune": ("prune", [f"--batch-size={HUGE}"], "--batch-size must be a whole number in [1, 65536]"),
    "epochs-train": ("train", [f"--epochs={HUGE}"], "argument --epochs: must be a whole number in [1, 100000]"),
    "epochs-prune": ("prune", [f"--finetune-epochs={HUGE}"], "--finetune-epochs must be a whole number in [0, 100000]"),
    "epochs-samples": ("prune3d", [f"--sample-epochs={HUGE}"], "--sample-epochs must be a whole number in [0, 100000]"),
    "repeats-profile": ("profile", [f"--repeats={HUGE}"], "argument --repeats: must be a whole number in [1, 10000]"),
    "repeats-fold": ("fold", [f"--repeats={HUGE}"], "argument --repeats: must be a whole number in [1, 10000]"),
    "repeats-compare": ("compare", [f"--repeats={HUGE}"], "--repeats must be a whole number in [1, 10000]"),
    "threads": ("profile", ["--threads=100000000"], "argument --threads: must be a whole number in [1, 1024]"),
    "threads-train": ("train", ["--threads=100000000"], "argument --threads: must be a whole number in [1, 1024]"),
    "workers": ("prune3d", ["--workers=100000000"], "argument --workers: must be a whole number in [0, 1024]"),
    "images-score": ("prune", [f"--score-images={HUGE}"], "--score-images must be a whole number in [1, 1000000000]"),
    "images-reconstruct": ("prune", [f"--reconstruct-images={HUGE}"],
        "--reconstruct-images must be a whole number in [0, 1000000000]"),
    "images-subset": ("train", [f"--train-subset={HUGE}"],
        "argument --train-subset/--subset: must be a whole number in [1, 1000000000]"),
    "probes": ("sensitivity", [f"--probes={HUGE}"], "--probes must be a whole number in [2, 100000]"),
    "probe-groups": ("sensitivity", ["--probe-groups=" + "9" * 5000],
        "--probe-groups must be a whole number in [1, 1048576]"),
    "steps": ("prune", [f"--steps={HUGE}"], "--steps must be a whole number in [1, 1000]"),
    "round-to": ("prune", [f"--round-to={HUGE}"], "--round-to must be a whole number in [1, 1048576]"),
    "samples": ("prune3d", [f"--samples={HUGE}"], "--samples must be a whole number in [4, 10000]"),
    "blocks": ("prune3d", [f"--min-blocks-per-stage={HUGE}"],
        "--min-blocks-per-stage must be a whole number in [1, 1000]"),
    "groups": ("convert", [f"--groups={HUGE}"], "--groups must be a whole number in [1, 1048576]"),
    "lr-train": ("train", ["--lr=1e300"], "argument --lr: must be a finite number above 0 and <= 1000"),
    "decay": ("train", ["--weight-decay=1e300"], "argument --weight-decay: must be a finite number >= 0 and <= 1000"),
    "lr-prune": ("prune", ["--finetune-lr=1e300"], "--finetune-lr must be a finite number above 0 and <= 1000"),
    "rel-stderr": ("sensitivity", ["--rel-stderr=1e300"], "--rel-stderr must be a finite number above 0 and <= 1"),
    "opset": ("export", ["--opset=99999"], "--opset must be between 7 and 30"),
    "list-budgets": ("compare", [f"--target-flops={MANY}"],
        "argument --target-flops: takes at most 100 values, got 1000"),
    "list-groups": ("explore", ["--scc-groups=" + ",".join(map(str, range(1, 1001)))], "takes at most 100 values"),
    "data-val-size": ("train", ["--data=synthetic:n=64,val_size=64"],
        "--data: synthetic option val_size must be below n (64)"),
    "data-demo": ("demo", ["--data=synthetic:n=-1"],
        "--data: synthetic option n must be a whole number in [10, 10000000]"),
    "data-explore": ("explore", ["--data=npz:/no/such/file.npz"], "npz"),
    "arg-digits": ("profile", ["--arg=num_classes=" + "9" * 5000],
        "--arg num_classes: its value is JSON leanconv will not read"),
    "explore-constructor": ("explore", ["--model=no.such.module:fn"], "cannot import 'no.such.module'"),
    "out-empty": ("train", ["--out="], "--out is empty"),
    "out-name-too-long": ("fold", ["--out=" + "y" * 300], "is no path: at most 4095 bytes, 255 a name"),
    "out-under-a-device": ("import", ["--out=/dev/null/x"], "lies under '/dev/null', which is a file"),
    "cache-dir-device": ("sensitivity", ["--cache-dir=/dev/null"], "--cache-dir '/dev/null' is a file, not a folder"),
    "line-break": ("report", None, "a\\nb/results.jsonl does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_value_out_of_range_is_one_line_before_work(case, world, tripwires, capsys):  # noqa: F811 (fixtures)
    command, extra, wanted = CASES[case]
    argv = [command, "a\nb"] if extra is None else [*render(command, bases(world)[command]), *extra]
    code, out, err = run_case(argv, capsys)
    assert not isinstance(code, Tripwire), "work started before the value was refused"
    assert code == 2 and not out, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanconv: error:"), err
    assert wanted in lines[0], lines[0]


@pytest.mark.parametrize("config,values,wanted", [
    (PruneConfig, {"steps": 10**9}, "--steps must be a whole number in [1, 1000]"),
    (PruneConfig, {"finetune_epochs": 10**12}, "--finetune-epochs must be a whole number in [0, 100000]"),
    (PruneConfig, {"batch_size": 10**12}, "--batch-size must be a whole number in [1, 65536]"),
    (Prune3dConfig, {"grid": 10**9}, "grid must be a whole number in [2, 10001]"),
    (SensitivityConfig, {"probe_groups": "9" * 5000}, "--probe-groups must be a whole number in [1, 1048576]"),
    (SensitivityConfig, {"rel_stderr": 2.0}, "--rel-stderr must be a finite number above 0 and <= 1"),
    (TrainConfig, {"epochs": 10**12}, "--epochs must be between 1 and 100000"),
    (TrainConfig, {"lr": 1e30}, "--lr must be a finite number above 0 and <= 1000"),
    (TrainConfig, {"seed": 2**64}, "--seed must be between 0 and 4294967295"),
    (TrainConfig, {"threads": 10**6}, "--threads must be between 1 and 1024"),
    (TrainConfig, {"momentum": 1.0}, "--momentum must be a finite number >= 0 and below 1"),
])
def test_the_library_api_has_the_same_ranges(config, values, wanted):
    with pytest.raises(LeanconvError) as exc:
        config(**values)
    assert wanted in str(exc.value)


def test_a_dataset_spec_is_checked_before_any_image_is_made():
    with pytest.raises(LeanconvError, match="val_size must be below n"):
        load_dataset("synthetic:n=64,val_size=64")
    with pytest.raises(LeanconvError, match=r"at most 4095 characters"):
        load_dataset("synthetic:" + "x" * 10_000)
