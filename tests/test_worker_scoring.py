"""The worker's evaluate and leaderboard jobs, in process on the bundled toy family: the original VLM and
the merge scored with the weights the worker holds; the leaderboard (cached) leaves those weights as
they were, bit for bit; a cancel stops it between batches."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from analysis import leaderboard
from analysis.eval_file import read_items
from analysis.evaluate import evaluate
from merging.drift import DriftResult, drift_settings
from merging.errors import LabError
from tests.worker_harness import RECIPE, TRIPLE, run, same_as
from webapp.presets import TOY_ROOT
from webapp.protocol import DriftRun
from webapp.ui.evaluate_panel import score_table
from webapp.worker.leaderboard_jobs import settings
from webapp.worker.models import load_serving


def live_state(w) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in w.models.loaded.model.state_dict().items()}


def test_evaluate_scores_the_original_and_the_merge_the_worker_holds(worker):
    ev, out, _ = run(worker, "merge", {"recipe": RECIPE})
    assert ev == "result", out
    ev, out, seen = run(worker, "evaluate", {"triple": TRIPLE, "recipe": RECIPE, "suites": ["perception", "text_math"],
                                              "limit": 6})
    assert ev == "result", out
    assert set(out["accuracy"]) == {"original", "merged"} and len(seen.progress) >= 2
    vlm = load_serving(TRIPLE["vlm"], "cpu")
    assert out["accuracy"]["original"] == evaluate(vlm, suites=["perception", "text_math"], limit=6)
    assert set(out["accuracy"]["merged"]) == {"perception", "text_math"}
    for m, by_suite in out["accuracy"].items():  # each item's outcome, for the panel's intervals
        for s, acc in by_suite.items():
            assert len(out["correct"][m][s]) == 6 and out["correct"][m][s].count("1") / 6 == pytest.approx(acc)
    table = score_table(out["accuracy"], "merge", out["correct"]).values.tolist()
    k = out["correct"]["original"]["perception"].count("1")
    z = 1.959963984540054  # the Wilson bounds by the quadratic formula, shown to 1 decimal in %
    a, b, c = 6 + z * z, -(2 * k + z * z), k * k / 6
    lo, hi = ((-b - (b * b - 4 * a * c) ** 0.5) / (2 * a), (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))
    assert table[0][1] == f"{100 * k / 6:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n 6)"
    assert re.fullmatch(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]( within noise)?", table[0][3])
    # the second time the scores come from the cache (no progress from evaluations)
    ev, again, _ = run(worker, "evaluate", {"triple": TRIPLE, "recipe": RECIPE, "suites": ["perception", "text_math"],
                                             "limit": 6})
    assert again["accuracy"] == out["accuracy"] and again["seconds"] < out["seconds"]
    ev, only, _ = run(worker, "evaluate", {"triple": TRIPLE, "recipe": None, "suites": ["text_math"], "limit": 3})
    assert ev == "result" and set(only["accuracy"]) == {"original"}
    ev, msg, _ = run(worker, "evaluate", {"triple": TRIPLE, "recipe": None, "suites": ["text_math"], "limit": 999})
    assert ev == "error" and msg == "items per suite: 999 is outside 1..300"


def _wilson95(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval, written out here as the test's own oracle."""
    z = 1.959964
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_outcome_scores_both_models_with_intervals_and_is_cached(worker):
    """A walkthrough step's measured outcome: each model's per-suite k of n agrees with a direct
    evaluation, its interval with the Wilson formula, the difference with the two accuracies; cached."""
    ev, out, _ = run(worker, "merge", {"recipe": RECIPE})
    assert ev == "result", out
    ev, out, seen = run(worker, "outcome", {"triple": TRIPLE, "recipe": RECIPE, "items": 5})
    assert ev == "result", out
    assert out["items"] == 5 and set(out["suites"]) == {"perception", "visual_math"} and len(seen.progress) >= 2
    vlm = load_serving(TRIPLE["vlm"], "cpu")
    direct = evaluate(vlm, suites=["perception", "visual_math"], limit=5)
    for suite, r in out["suites"].items():
        assert r["original"]["n"] == 5 and abs(r["original"]["k"] - 5 * direct[suite]) < 1e-6
        for side in ("original", "merged"):
            lo, hi = _wilson95(r[side]["k"], 5)
            assert abs(r[side]["lo"] - lo) < 1e-4 and abs(r[side]["hi"] - hi) < 1e-4
        d = r["diff"]
        assert abs(d["diff"] - (r["merged"]["k"] - r["original"]["k"]) / 5) < 1e-9 and d["lo"] <= d["diff"] <= d["hi"]
        assert d["noise"] == (d["lo"] <= 0 <= d["hi"])
    ev, again, seen_again = run(worker, "outcome", {"triple": TRIPLE, "recipe": RECIPE, "items": 5})
    assert again["suites"] == out["suites"] and len(seen_again.progress) < len(seen.progress)  # the per-item outcomes came from the cache
    ev, msg, _ = run(worker, "outcome", {"triple": TRIPLE, "recipe": None})
    assert ev == "error" and msg == "outcome: nothing to compare (no merge or DRIFT run given)"


def test_evaluate_a_drift_result_as_the_merged_side(worker):
    """A DRIFT result (here: a copy of the VLM itself) answers on the merged side, like in the chat."""
    folder = Path(worker.cache_dir, "drift", "copy-of-the-vlm")
    shutil.copytree(TOY_ROOT / "vlm", folder)
    settings = drift_settings({"mode": "absolute", "alpha": 0.5, "steps": 3, "lr": 1e-4})
    result = DriftResult(folder=str(folder), vlm=TRIPLE["vlm"], reasoner=TRIPLE["reasoner"], settings=settings)
    variant = DriftRun(result, (TRIPLE["vlm"], TRIPLE["reasoner"], TRIPLE["base"]))
    ev, out, _ = run(worker, "evaluate", {"triple": TRIPLE, "recipe": variant, "suites": ["visual_math"], "limit": 4})
    assert ev == "result", out
    assert out["labels"]["merged"] == "DRIFT (absolute, alpha 0.5), 3 steps, lr 0.0001"
    assert out["accuracy"]["merged"] == out["accuracy"]["original"]
    # not a folder the worker's DRIFT runs wrote
    elsewhere = DriftRun(replace(result, folder=str(TOY_ROOT / "vlm")), variant.triple)
    ev, msg, _ = run(worker, "evaluate", {"triple": TRIPLE, "recipe": elsewhere, "suites": ["visual_math"], "limit": 4})
    assert ev == "error" and msg == "that DRIFT result is gone; run DRIFT again"


def test_evaluate_an_uploaded_set_lists_the_disagreements(worker, tmp_path):
    rows = [json.loads(x) for x in (TOY_ROOT / "eval" / "visual_math.jsonl").read_text().splitlines()[:12]]
    for r in rows:
        shutil.copy(TOY_ROOT / "eval" / r["image"], tmp_path / Path(r["image"]).name)  # flat: uploaded one by one
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = {"triple": TRIPLE, "recipe": RECIPE, "suite_file": str(tmp_path / "mine.jsonl"), "by_name": True,
            "name": "mine.jsonl"}
    ev, out, _ = run(worker, "evaluate", args)
    assert ev == "result", out
    assert set(out["accuracy"]["original"]) == {"custom"} and out["items"] == 12
    items = read_items(tmp_path / "mine.jsonl", by_name=True)
    want = evaluate(load_serving(TRIPLE["vlm"], "cpu"), suites=[], extra={"custom": items})
    assert out["accuracy"]["original"] == want
    assert out["disagree_total"] == len(out["disagree"])
    for d in out["disagree"]:
        assert d["original"] != d["merged"] and Path(d["image"]).parent == tmp_path and d["line"] >= 1


def test_leaderboard_leaves_the_workers_weights_bit_identical(worker):
    ev, out, _ = run(worker, "merge", {"recipe": RECIPE})
    merged_before, key_before = live_state(worker), worker.models.loaded.current
    args = {"limit": 2, "dev_items": 2, "grid_size": 1, "methods": ["linear", "task_arithmetic"]}
    ev, out, seen = run(worker, "leaderboard", args)
    assert ev == "result", out
    entries = out["result"]["entries"]
    assert [(e["method"], e["label"]) for e in entries][:4] == [("vlm", "the VLM"), ("reasoner", "the math LLM"),
                                                                 ("linear", "defaults"), ("linear", "best on dev")]
    assert not out["cached"] and len(seen.progress) >= 5 and (Path(out["folder"]) / "leaderboard.md").is_file()
    done, total, _ = seen.progress[-1]
    assert done == total == leaderboard.steps(args["methods"], 4, 1)  # the bar ends full
    # the worker still holds the tab's merge, tensor for tensor; restored, the checkpoint's weights
    assert worker.models.loaded.current == key_before and same_as(worker, merged_before)
    worker.models.loaded.hold(None)
    checkpoint, _ = load_serving(TRIPLE["vlm"], "cpu")
    assert same_as(worker, checkpoint.state_dict())
    t0 = time.monotonic()
    ev, again, _ = run(worker, "leaderboard", args)
    assert again["cached"] and again["result"] == out["result"] and time.monotonic() - t0 < 5


def test_leaderboard_cancel_stops_between_batches_and_keeps_the_weights(worker):
    worker.models.loaded.hold(RECIPE)
    before = live_state(worker)
    args = {"limit": 3, "dev_items": 3, "grid_size": 2, "methods": ["ties"]}
    ev, msg, _ = run(worker, "leaderboard", args, cancel_at=2)
    assert ev == "cancelled", msg
    assert same_as(worker, before)
    assert not list(Path(worker.cache_dir, "leaderboard").glob(".*.tmp-*"))  # its temp folder is gone


def test_leaderboard_settings_are_checked():
    assert settings({})["methods"][0] == "linear"
    for bad, msg in [({"limit": 0}, "limit: 0 is not a whole number in 1..300"),
                     ({"grid_size": 1.5}, "grid size: 1.5 is not"), ({"dev_items": "x"}, "dev items: 'x' is not"),
                     ({"methods": ["nope"]}, "unknown method(s): nope")]:
        with pytest.raises(LabError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            settings(bad)


def test_an_unknown_job_kind_is_one_clear_error_and_every_lane_kind_is_registered(worker):
    from webapp.protocol import CHAT_LANE
    from webapp.worker.process import JOBS

    ev, msg, _ = run(worker, "nonsense", {})
    assert ev == "error" and msg.startswith("unknown job kind 'nonsense'; known: ") and "merge" in msg
    assert set(CHAT_LANE) <= set(JOBS)
    assert set(JOBS) == {"ping", "plan", "merge", "chat", "analysis", "evaluate", "leaderboard", "drift", "export",
                         "outcome", "sweep", "tune", "handout"}
