"""The worker's sweep and tune jobs, in process on the bundled toy family: points arrive one by one as
"partial" events and equal the merges scored on their own; afterwards, and after a cancel, the model
the worker holds is the checkpoint's, bit for bit; a tune run twice continues its study."""

from __future__ import annotations

from pathlib import Path

from analysis import tune_results
from analysis.evaluate import evaluate
from merging.inplace import InPlaceMerger
from merging.recipe import from_dict
from tests.worker_harness import RECIPE, TRIPLE, run, same_as
from webapp.presets import TOY_ROOT
from webapp.ui import leaderboard_panel
from webapp.worker.models import load_serving


def test_sweep_streams_its_points_and_leaves_the_checkpoints_weights(worker, checkpoint):
    ev, out, _ = run(worker, "merge", {"recipe": RECIPE})  # a merge is live when the sweep starts
    assert ev == "result", out
    ev, out, seen = run(worker, "sweep", {"recipe": RECIPE, "knob": "alpha", "values": [0.2, 1.2], "limit": 3})
    assert ev == "result", out
    assert [p["value"] for p in seen.partial] == [0.2, 1.2] and seen.partial == out["points"]
    assert same_as(worker, checkpoint) and worker.models.loaded.merger.current is None
    # each point is its recipe merged by a fresh merger on a fresh model, scored on its own
    model, proc = load_serving(TRIPLE["vlm"], "cpu")
    merger = InPlaceMerger(model, *TRIPLE.values())
    for p in out["points"]:
        merger.apply(from_dict({**RECIPE, "parameters": {"alpha": p["value"]}}))
        want = evaluate((model, proc), limit=3, eval_dir=TOY_ROOT / "eval")
        merger.restore()
        assert {s: p[s]["k"] for s in want} == {s: round(a * 3) for s, a in want.items()}


def test_a_cancelled_sweep_leaves_the_checkpoints_weights(worker, checkpoint):
    ev, out, _ = run(worker, "merge", {"recipe": RECIPE})
    assert ev == "result", out
    ev, out, seen = run(worker, "sweep", {"recipe": RECIPE, "knob": "alpha", "values": [0.1, 0.5, 0.9, 1.3],
                                             "limit": 20}, cancel_at=2)
    assert ev == "cancelled", out
    assert len(seen.partial) < 4
    assert same_as(worker, checkpoint) and worker.models.loaded.merger.current is None


def test_a_bad_sweep_is_refused_in_one_line_before_any_merge(worker):
    ev, out, _ = run(worker, "sweep", {"recipe": RECIPE, "knob": "nope", "values": [0.1]})
    assert ev == "error" and "nope" in out and "\n" not in out
    ev, out, _ = run(worker, "sweep", {"recipe": RECIPE, "knob": "alpha", "values": [0.1], "limit": 0})
    assert ev == "error" and "limit" in out


def test_tune_job_continues_its_study_and_leaves_the_checkpoints_weights(worker, checkpoint):
    args = {"triple": TRIPLE, "method": "task_arithmetic", "trials": 2, "limit": 2, "dev_items": 2, "test_limit": 2}
    ev, out, _ = run(worker, "tune", args)
    assert ev == "result", out
    assert out["result"]["trials"] == 2
    ev, again, _ = run(worker, "tune", {**args, "trials": 1})
    assert ev == "result", again
    assert again["result"]["trials"] == 3 and again["folder"] == out["folder"]
    assert same_as(worker, checkpoint)
    # the leaderboard's row for the method: the newest tune's chosen point, its held-out scores and intervals
    rows = tune_results.newest(Path(worker.cache_dir, "tune"), ["linear", "task_arithmetic"])
    best = again["result"]["best"]
    assert [r["method"] for r in rows] == ["task_arithmetic"] and rows[0]["knobs"] == best["knobs"]
    for s, iv in best["test"].items():
        assert rows[0]["test"][s] == iv["acc"] and rows[0]["ci"][s][0] <= iv["acc"] <= rows[0]["ci"][s][1]
    assert "->" in leaderboard_panel._knobs_text(rows[0]["knobs"])  # a schedule, shown start -> end
