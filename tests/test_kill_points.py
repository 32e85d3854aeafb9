"""Failure injection: ``train``, ``prune``, ``sensitivity``, ``compare`` and ``prune3d`` killed
at every file-system step on their output folder (tests/kill_points.py).

For every step k, the folder a kill just before it leaves must show either the old set of
files (the template: an earlier run's, or nothing) or the new one, never a mix: every file
set (a folder's files written with ``write_together``) is whole from one side; files written
alone are each old or new; an append-only store (``*.jsonl``) holds a prefix of the new
store's lines. ``train`` writes one set per epoch: there, every visible set must agree with
itself (the epoch its checkpoints record is the number of its metrics rows). At the first
and the last k of every stretch of equal visible states (for ``compare``, the last only),
the command is really killed with SIGKILL (its folder must match the copy made at that
step, file for file old or new), then run again (with ``--resume`` for ``train`` when a training state is there): the
rerun must succeed and end with the weights of the uninterrupted run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leanconv import checkpoint

from kill_points import visible  # the harness beside this file (tests/ is on the path, as for conftest)

HARNESS = Path(__file__).with_name("kill_points.py")
STORES = ("metrics.jsonl", "results.jsonl", "samples.jsonl")
SMALL = ["--no-progress", "--data", "synthetic"]
# the refit after a cut writes nothing, so it adds no kill point: a few images keep it in the
# run without the cost of the default 512 in every one of the dozens of runs a test makes
FEW_REFIT = ["--reconstruct-images", "32"]


def _run(argv: list[str]) -> None:
    code = subprocess.run([sys.executable, "-m", "leanconv.cli.main", *argv], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    _run(["train", "--model", "resnet20", "--epochs", "1", "--train-subset", "64", "--batch-size", "32", *SMALL,
          "--out", str(out)])
    return out / "model.safetensors"


def _inject(tmp_path: Path, argv: list[str], *, before: list[str] | None = None,
            resume: list[str] | None = None, reruns: str = "edges") -> tuple[dict, Path, Path | None]:
    """Run the harness on ``argv`` (its ``--out`` is ``tmp_path/out``), after ``before`` in the
    same folder; returns its summary, its results folder and the template folder (None for a
    fresh folder)."""
    folder = tmp_path / "out"
    out = ["--out", str(folder)]
    spec = {"argv": [*argv, *out], "folder": str(folder), "resume": resume, "reruns": reruns,
            "before": [*before, *out] if before else None}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(HARNESS), str(tmp_path / "spec.json"), str(results)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["run"] == "exit 0", (results / "states.log").read_text()[-2000:]
    assert summary["steps"] >= 5 and summary["points"]
    return summary, results, results / "template" if before else None


def _visible(folder: Path) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in visible(folder)}


def _set_folders(final: Path) -> list[str]:
    """The folders (relative) whose files form file sets: those with a ``.leanconv`` folder."""
    return sorted(str(p.parent.relative_to(final)) for p in final.rglob(".leanconv") if p.is_dir())


def _check_old_or_new(state: Path, old: dict[str, bytes], new: dict[str, bytes], sets: list[str], where: str) -> None:
    seen = _visible(state)
    assert set(seen) <= set(old) | set(new), f"{where}: files of neither run: {sorted(set(seen) - set(old) - set(new))}"
    for rel, data in seen.items():
        if Path(rel).name in STORES:
            lines = data.decode().splitlines(keepends=True)
            assert new[rel].decode().splitlines(keepends=True)[:len(lines)] == lines, f"{where}: {rel} not a prefix"
        else:
            assert data in (old.get(rel), new.get(rel)), f"{where}: {rel} is neither the old file nor the new one"
    for folder in sets:
        def members(files, folder=folder):
            return {r: d for r, d in files.items()
                    if str(Path(r).parent) == folder and Path(r).name not in STORES}
        now = members(seen)
        assert now in ({}, members(old), members(new)), f"{where}: the set in {folder or '.'} mixes runs: {sorted(now)}"


def _check_all_states(summary: dict, results: Path, template: Path | None) -> None:
    final = results / "states" / str(summary["steps"] + 1)
    old, new, sets = _visible(template) if template else {}, _visible(final), _set_folders(final)
    for k in range(1, summary["steps"] + 1):
        _check_old_or_new(results / "states" / str(k), old, new, sets, f"killed before step {k}")
    for point in summary["points"]:  # a real kill leaves what the copy made at that step shows
        k = point["k"]
        assert point["killed"] == "signal 9", f"step {k}: the kill did not happen ({point['killed']})"
        killed, copied = _old_or_not(results / str(k) / "killed", old), _old_or_not(results / "states" / str(k), old)
        assert killed == copied, f"really killed before step {k}: {killed} != {copied}"


def _old_or_not(folder: Path, old: dict[str, bytes]) -> dict[str, bool]:
    """Per visible file, whether it is the old run's (timings make two new runs' files differ)."""
    return {rel: data == old.get(rel) for rel, data in _visible(folder).items()}


def _same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{a / name} differs from {b / name}"


def _check_reruns(summary: dict, results: Path, weights: tuple[str, ...] = ("model.safetensors",)) -> None:
    final = results / "states" / str(summary["steps"] + 1)
    want = set(_visible(final))
    for point in summary["points"]:
        rerun = results / str(point["k"]) / "rerun"
        assert point["rerun"] == "exit 0", (results / f"{point['k']}.rerun.log").read_text()[-2000:]
        assert set(_visible(rerun)) == want, f"rerun after a kill before step {point['k']}"
        for name in weights:
            _same_weights(rerun, final, name)


def test_train_killed_at_every_step_shows_one_whole_epoch_and_resumes_to_the_same_weights(tmp_path):
    argv = ["train", "--model", "resnet20", "--epochs", "2", "--train-subset", "64", "--batch-size", "32", *SMALL]
    summary, results, _ = _inject(tmp_path, argv, resume=["train_state.safetensors", "--resume"])
    names = {"config.json", "metrics.jsonl", "model.safetensors", "train_state.safetensors"}
    for k in range(1, summary["steps"] + 2):
        state = results / "states" / str(k)
        seen = set(_visible(state))
        assert seen in (set(), names), f"killed before step {k}: {sorted(seen)}"
        if seen:
            rows = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
            done = {checkpoint.read_header(state / n)["meta"]["epochs_done"]
                    for n in names if n.endswith(".safetensors")}
            assert done == {len(rows)} and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1)), k
    assert any(p["resumed"] for p in summary["points"])  # a kill after the first epoch resumes
    _check_reruns(summary, results, ("model.safetensors", "train_state.safetensors"))
    for point in summary["points"]:
        rows = (results / str(point["k"]) / "rerun" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_prune_killed_at_every_step_shows_the_old_run_or_the_new_one(tmp_path, trained):
    argv = ["prune", str(trained), "--method", "l1", "--finetune-epochs", "0", "--repeats", "1", "--score-images", "32",
            *FEW_REFIT, "--no-progress"]
    summary, results, template = _inject(tmp_path, [*argv, "--target-flops", "0.5"],
                                         before=[*argv, "--target-flops", "0.7"])
    _check_all_states(summary, results, template)
    _check_reruns(summary, results)


def test_sensitivity_killed_at_every_step_shows_the_old_run_or_the_new_one(tmp_path, trained):
    argv = ["sensitivity", str(trained), "--probes", "2", "--score-images", "32", "--no-progress"]
    summary, results, template = _inject(tmp_path, [*argv, "--seed", "1"], before=[*argv, "--seed", "2"])
    _check_all_states(summary, results, template)
    _check_reruns(summary, results, ())
    final = json.loads((results / "states" / str(summary["steps"] + 1) / "sensitivity.json").read_text())
    for point in summary["points"]:
        again = json.loads((results / str(point["k"]) / "rerun" / "sensitivity.json").read_text())
        assert again["layers"] == final["layers"] and again["channels"] == final["channels"]


def test_compare_killed_at_every_step_keeps_whole_entries_and_resumes(tmp_path, trained):
    argv = ["compare", str(trained), "--methods", "l1", "--target-flops", "0.5", "--finetune-epochs", "0",
            "--repeats", "1", "--no-onnx", "--score-images", "32", "--quick", *FEW_REFIT, "--no-progress"]
    summary, results, _ = _inject(tmp_path, argv, reruns="last")  # ten stretches: the CI budget
    _check_all_states(summary, results, None)
    _check_reruns(summary, results, ())


def test_prune3d_killed_at_every_step_keeps_whole_samples_and_resumes(tmp_path, trained):
    argv = ["prune3d", str(trained), "--target-flops", "0.5", "--samples", "4", "--workers", "0",
            "--sample-images", "64", "--finetune-epochs", "0", "--score-images", "32", "--probes", "2",
            "--repeats", "1", *FEW_REFIT, "--no-progress"]
    summary, results, _ = _inject(tmp_path, argv)
    _check_all_states(summary, results, None)
    _check_reruns(summary, results)
