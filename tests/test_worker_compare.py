"""Two merges (or a merge and a DRIFT run) side by side, in process on the bundled toy family: the chat's
right pane and Evaluate's second column answer with the model the tab compares with, each answer equal to
a plain greedy generate() of that recipe's folder written by the streaming engine; a repeated turn merges
nothing; a model of another triple is refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from analysis.evaluate import evaluate
from merging.drift import DriftResult, drift_settings
from merging.merge_identity import merge_key
from merging.recipe import from_dict
from tests.chat_reference import TOKENS, Reference
from tests.worker_harness import RECIPE, TRIPLE, run, same_as
from webapp.presets import TOY_ROOT
from webapp.protocol import DriftRun

B = {**TRIPLE, "method": "linear", "parameters": {"alpha": 0.5}}
Q = "mia has 7 birds and gets 9 . how many birds does mia have now ?"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return Reference(TOY_ROOT, tmp_path_factory.mktemp("ref"))


def _chat(worker, recipe, compare):
    return run(worker, "chat", {"triple": TRIPLE, "recipe": recipe, "compare": compare, "question": Q,
                                "max_new_tokens": TOKENS})


def test_chat_compares_two_merges_and_a_repeated_turn_merges_nothing(worker, reference, checkpoint):
    keys = {merge_key(from_dict(r)) for r in (RECIPE, B)}
    kept_before = set(worker.models.loaded.merger.snapshots()) if worker.models.loaded else set()
    ev, out, seen = _chat(worker, RECIPE, B)
    assert ev == "result", out
    assert out["answers"]["merged"] == reference.answer(RECIPE, Q)
    assert out["answers"]["original"] == reference.answer(B, Q)
    assert out["answers"]["merged"] != out["answers"]["original"]  # else the test could not tell them apart
    assert {t["stream"] for t in seen.tokens} == {"merged", "original"}
    # this turn merged A and B: neither was kept before it, both are now (progress lines are sent at most
    # every 0.1 s, so a fast machine may send none of a toy merge's steps: they cannot tell)
    assert not keys & kept_before and keys <= set(worker.models.loaded.merger.snapshots())
    ev, again, seen = _chat(worker, RECIPE, B)
    assert again["answers"] == out["answers"]
    assert not [p for p in seen.progress if p[2].startswith("layer ")]  # both kept: swaps, no merge
    ev, vlm, _ = _chat(worker, RECIPE, None)  # the original VLM again on the right
    assert vlm["answers"]["original"] == reference.answer(None, Q)
    worker.models.loaded.hold(None)
    assert same_as(worker, checkpoint)


def test_evaluate_scores_the_tabs_merge_against_another_merge(worker):
    args = {"triple": TRIPLE, "recipe": RECIPE, "compare": B, "suites": ["visual_math"], "limit": 4}
    ev, out, _ = run(worker, "evaluate", args)
    assert ev == "result", out
    assert out["labels"] == {"original": "linear", "merged": "task_arithmetic"}
    worker.models.loaded.hold(B)  # B's weights, scored here directly
    want = evaluate((worker.models.loaded.model, worker.models.loaded.processor), suites=["visual_math"], limit=4,
                    eval_dir=TOY_ROOT / "eval")
    assert out["accuracy"]["original"] == want


def test_a_drift_run_on_the_right_and_a_model_of_another_triple_refused(worker, tmp_path):
    folder = Path(worker.cache_dir, "drift", "copy-of-the-vlm-2")
    shutil.copytree(TOY_ROOT / "vlm", folder)
    result = DriftResult(folder=str(folder), vlm=TRIPLE["vlm"], reasoner=TRIPLE["reasoner"],
                         settings=drift_settings({"mode": "absolute", "alpha": 0.5, "steps": 3, "lr": 1e-4}))
    drift = DriftRun(result, (TRIPLE["vlm"], TRIPLE["reasoner"], TRIPLE["base"]))
    ev, out, _ = run(worker, "evaluate", {"triple": TRIPLE, "recipe": RECIPE, "compare": drift,
                                          "suites": ["perception"], "limit": 3})
    assert ev == "result", out
    assert out["labels"]["original"] == drift.label
    other = {**B, "base": str(tmp_path / "another-base")}
    ev, msg, _ = _chat(worker, RECIPE, other)
    assert ev == "error" and msg.startswith("the model to compare with was made on another triple") and "\n" not in msg


def test_a_plan_keeping_one_merge_says_each_turn_merges_both_sides(worker):
    """Above the plan's size for a second kept merge (real models), two merges side by side still answer,
    re-merged each turn, and the turn says so."""
    loaded = worker.models.get(tuple(TRIPLE.values()))
    kept = loaded.merger.max_snapshots
    try:
        loaded.merger.max_snapshots = 1  # what the plan gives a 0.5B or larger model
        ev, out, seen = _chat(worker, RECIPE, B)
        assert ev == "result", out
        assert out["answers"]["original"] and any("merges both sides again" in n for n in out["notices"])
        ev, vlm, _ = _chat(worker, RECIPE, None)
        assert not any("merges both sides" in n for n in vlm["notices"])
    finally:
        loaded.merger.max_snapshots = kept
