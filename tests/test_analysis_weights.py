"""Analyses of the live model run on, and are cached under, the weights they name.

The reported sequence: a merge, another merge, the first one again (from its snapshot), then
the attention-decay analysis, which must measure the original VLM (FRANK's prior) and be stored
under the checkpoint's weights id; knockout keeps one entry per model, so the VLM's baseline is
the same whichever merge it is shown beside. Results are compared with the same analyses run
here on a fresh from_pretrained model (an independent load of the same weights).
"""

from __future__ import annotations

import queue

import pytest

from webapp.presets import TOY_ROOT

pytestmark = pytest.mark.slow


def _recipe(method: str, alpha: float) -> dict:
    return {"vlm": str(TOY_ROOT / "vlm"), "reasoner": str(TOY_ROOT / "math"), "base": str(TOY_ROOT / "base"),
            "method": method, "parameters": {"alpha": alpha}}


A, B = _recipe("linear", 0.9), _recipe("task_arithmetic", 1.0)
TRIPLE = {k: A[k] for k in ("vlm", "reasoner", "base")}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    import torch

    from analysis import cache
    from webapp.worker.process import Worker

    if not (TOY_ROOT / "vlm" / "config.json").is_file():
        pytest.skip("the bundled toy family is not here")
    torch.set_num_threads(1)
    cache._shared.clear()
    yield Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path_factory.mktemp("c"))})
    cache._shared.clear()


def run(worker, kind: str, args: dict) -> dict:
    return worker.call(kind, args, 1)


def fresh_vlm(attn: str | None = None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kw = {"attn_implementation": attn} if attn else {}
    model = AutoModelForImageTextToText.from_pretrained(TOY_ROOT / "vlm", dtype=torch.float32, **kw).eval()
    return model, AutoProcessor.from_pretrained(TOY_ROOT / "vlm")


def stored(worker, name: str, parts: dict):
    from analysis import cache

    return cache.get_cache(worker.cache_dir).get(cache.make_key(name, parts))


def test_attention_after_a_cached_merge_measures_the_original(worker):
    from analysis import attention
    from merging.merge_identity import triple_fingerprints, weights_id

    for r in (A, B, A):  # the third comes from the merger's snapshot
        run(worker, "merge", {"recipe": r})
    out = run(worker, "analysis", {"name": "attention", "triple": TRIPLE})
    model, proc = fresh_vlm("eager")
    images = attention.load_images(sorted((TOY_ROOT / "samples").glob("*.png")), limit=16)
    want = attention.attention_decay(model, proc, images, attention.DEFAULT_QUESTION, limit=None)
    assert out["beta"] == pytest.approx(want["beta"], rel=1e-4, abs=1e-6)
    wid = weights_id(triple_fingerprints(TRIPLE["vlm"], None), None)
    entry = stored(worker, "attention", {"weights": wid, "images": attention.images_key(images),
                                                "question": attention.DEFAULT_QUESTION})
    assert entry is not None and entry["shares"] == pytest.approx(want["shares"], rel=1e-4, abs=1e-6)
    assert worker.models.loaded.merger.current is None


def test_knockout_baseline_is_the_vlm_beside_any_merge(worker):
    from functools import partial

    from analysis import knockout
    from analysis.analyses.knockout_spec import eval_key
    from analysis.evaluate import evaluate
    from merging.merge_identity import merge_key, triple_fingerprints, weights_id
    from merging.recipe import from_dict

    run(worker, "merge", {"recipe": A})
    run(worker, "merge", {"recipe": B})
    run(worker, "merge", {"recipe": A})  # snapshot again: the state that used to poison the baseline
    run(worker, "analysis", {"name": "knockout", "triple": TRIPLE, "recipe": A, "limit": 1})
    fps = triple_fingerprints(TRIPLE["vlm"], TRIPLE["reasoner"], TRIPLE["base"])
    suites = eval_key(TOY_ROOT / "eval")
    ko_suites = list(knockout.SUITES)
    vlm_entry = stored(worker, "knockout", {"weights": weights_id(fps, None), "limit": 1, "eval": suites,
                                                                    "suites": ko_suites})
    a_entry = stored(worker, "knockout", {"weights": weights_id(fps, merge_key(from_dict(A))), "limit": 1,
                                          "eval": suites, "suites": ko_suites})
    model, proc = fresh_vlm()
    want = knockout.knockout(model, proc, partial(evaluate, eval_dir=TOY_ROOT / "eval"), limit=1)
    for suite, acc in want["baseline"].items():
        assert vlm_entry["baseline"][suite] == pytest.approx(acc)
    for group, per_suite in want["drop"].items():
        for suite, drops in per_suite.items():
            assert vlm_entry["drop"][group][suite] == pytest.approx(drops)
    assert a_entry is not None
    # Beside another merge the VLM's entry is the one shown; the merge gets its own entry.
    run(worker, "merge", {"recipe": B})
    out = run(worker, "analysis", {"name": "knockout", "triple": TRIPLE, "recipe": B, "limit": 1})
    assert "VLM" in out["summary"]
    assert stored(worker, "knockout", {"weights": weights_id(fps, merge_key(from_dict(B))), "limit": 1,
                                       "eval": suites, "suites": ko_suites})
