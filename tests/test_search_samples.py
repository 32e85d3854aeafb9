"""3-D pruning samples: the append-only store, the plan, resume, local and Ray executors."""

import json
import math

import pytest

from leanconv.errors import LeanconvError
from leanconv.prune3d.executors import LocalExecutor, RayExecutor, create_executor
from leanconv.prune3d.realise import StepSettings, load_origin
from leanconv.prune3d.samples import SampleStore, collect_samples, plan_tasks, settings_hash, task_keys

SETTINGS = StepSettings(data="synthetic", method="l1", epochs=0, score_images=64)


class CountingExecutor(LocalExecutor):
    """In-process executor that remembers which tasks it ran."""

    def __init__(self):
        super().__init__(workers=0)
        self.ran = []

    def run(self, fn, args_list):
        self.ran += [args[2] for args in args_list]
        yield from super().run(fn, args_list)


def test_store_appends_skips_torn_line_and_duplicates(tmp_path):
    store = SampleStore(tmp_path / "s.jsonl")
    assert store.read() == [] and store.keys() == set()
    assert store.append([{"key": "a", "accuracy": 1.0}, {"key": "b", "accuracy": 2.0}]) == 2
    with open(store.path, "a") as fh:
        fh.write('{"key": "c", "accur')  # a write cut short by a crash
    assert [s["key"] for s in store.read()] == ["a", "b"]
    store.append([{"key": "c", "accuracy": 3.0}, {"key": "a", "accuracy": 9.0}])
    samples = store.read()
    assert [s["key"] for s in samples] == ["a", "b", "c"] and samples[0]["accuracy"] == 1.0
    assert len(store.path.read_text().splitlines()) == 5
    with pytest.raises(LeanconvError):
        store.append([{"accuracy": 1.0}])


def test_plan_counts_levels_and_budget_surface():
    tasks = plan_tasks(16, n_blocks=7, min_keep=3, side=28, min_side=14, w_min=0.4, target=0.33)
    kinds = [t["kind"] for t in tasks]
    assert kinds[0] == "base" and kinds.count("mixed") == 15 // 4
    assert sum(len(task_keys(t, "h")) for t in tasks) == 16
    depth = next(t for t in tasks if t["kind"] == "depth")["steps"]
    assert depth == sorted(depth, reverse=True) and depth[-1] == 3 and depth[0] < 7
    sides = next(t for t in tasks if t["kind"] == "resolution")["steps"]
    assert sides[-1] == 14 and all(14 <= s < 28 for s in sides)
    widths = next(t for t in tasks if t["kind"] == "width")["steps"]
    assert widths[-1] == pytest.approx(0.4) and all(0.4 <= w < 1 for w in widths)
    for t in tasks:
        if t["kind"] == "mixed":
            keep, w, side = t["point"]
            d, r = keep / 7, side / 28
            clipped = w in (0.4, 1.0)
            assert clipped or d * w * w * r * r == pytest.approx(0.33, rel=1e-3)
    # depth has only 4 levels: extra chain steps go to the other chains
    tasks = plan_tasks(20, n_blocks=7, min_keep=3, side=16, min_side=8, w_min=0.5, target=0.3, mixed=0)
    assert len(next(t for t in tasks if t["kind"] == "depth")["steps"]) == 4
    assert sum(len(task_keys(t, "h")) for t in tasks) == 20
    with pytest.raises(LeanconvError):
        plan_tasks(3, n_blocks=7, min_keep=3, side=16, min_side=8, w_min=0.5, target=0.3)


def _tiny_tasks():
    return [{"kind": "base"}, {"kind": "depth", "steps": [5, 3]}, {"kind": "mixed", "point": [4, 0.7, 12]}]


def test_collect_records_samples_and_resumes(trained_ckpt, tmp_path):
    store = SampleStore(tmp_path / "samples.jsonl")
    first = CountingExecutor()
    samples = collect_samples(trained_ckpt, SETTINGS, _tiny_tasks(), store, first)
    assert len(first.ran) == 3 and len(samples) == 4
    by_key = {s["key"].split("/")[1]: s for s in samples}
    origin = load_origin(str(trained_ckpt), SETTINGS)
    assert by_key["base:base"]["macs"] == origin.macs and by_key["base:base"]["d"] == 1.0
    assert by_key["depth:keep=3"]["d"] == pytest.approx(3 / 7) and by_key["depth:keep=3"]["macs"] < origin.macs
    mixed = by_key["mixed:keep=4,w=0.7000,side=12"]
    assert mixed["side"] == 12 and mixed["r"] == 0.75 and mixed["keep"] == 4
    assert abs(mixed["w"] - 0.7) < 0.7 * 0.02  # width keeps w^2 of the post-depth MACs, within 2%
    for s in samples:
        assert s["kind"] in ("base", "depth", "mixed") and 0 <= s["accuracy"] <= 100 and s["seconds"] >= 0
    # resume: nothing left to do
    again = CountingExecutor()
    assert collect_samples(trained_ckpt, SETTINGS, _tiny_tasks(), store, again) == samples and again.ran == []
    # an interrupted run lost the mixed sample: only that task runs again
    lines = store.path.read_text().splitlines()
    store.path.write_text("\n".join(l for l in lines if "mixed" not in l) + "\n")
    third = CountingExecutor()
    assert len(collect_samples(trained_ckpt, SETTINGS, _tiny_tasks(), store, third)) == 4
    assert [t["kind"] for t in third.ran] == ["mixed"]
    # other settings are other samples
    other = StepSettings(data="synthetic", method="l1", epochs=0, score_images=32)
    assert settings_hash(trained_ckpt, other) != settings_hash(trained_ckpt, SETTINGS)


def test_local_processes_match_in_process(trained_ckpt, tmp_path):
    tasks = [{"kind": "base"}, {"kind": "mixed", "point": [4, 1.0, 10]}]
    inline = collect_samples(trained_ckpt, SETTINGS, tasks, SampleStore(tmp_path / "a.jsonl"), LocalExecutor(0))
    spawned = collect_samples(trained_ckpt, SETTINGS, tasks, SampleStore(tmp_path / "b.jsonl"),
                              LocalExecutor(workers=2, threads=1))
    strip = lambda rows: sorted((r["key"], r["accuracy"], r["macs"]) for r in rows)  # noqa: E731
    assert strip(inline) == strip(spawned) and len(spawned) == 2


def test_ray_executor_collects_into_store(trained_ckpt, tmp_path):
    pytest.importorskip("ray")
    store = SampleStore(tmp_path / "samples.jsonl")
    tasks = [{"kind": "base"}, {"kind": "mixed", "point": [3, 1.0, 8]}]
    done = []
    samples = collect_samples(trained_ckpt, SETTINGS, tasks, store, RayExecutor(workers=2, threads=1),
                              progress=lambda d, t, info: done.append((d, t)))
    assert len(samples) == 2 and {s["kind"] for s in samples} == {"base", "mixed"}
    assert done[0] == (0, 2) and done[-1] == (2, 2)
    lines = [json.loads(l) for l in store.path.read_text().splitlines()]
    assert sorted(l["key"] for l in lines) == sorted(s["key"] for s in samples)
    mixed = next(s for s in samples if s["kind"] == "mixed")
    origin = load_origin(str(trained_ckpt), SETTINGS)
    assert mixed["d"] == pytest.approx(3 / 7) and mixed["side"] == 8
    assert mixed["macs"] < 0.25 * origin.macs and not math.isnan(mixed["accuracy"])


def test_executor_choice_errors():
    with pytest.raises(LeanconvError, match="unknown executor"):
        create_executor("dask")
    with pytest.raises(LeanconvError, match="ray executor"):
        create_executor("local", address="localhost:6379")
    with pytest.raises(LeanconvError):
        LocalExecutor(workers=-1)
