"""The CLI report and the app's worker run one pipeline (analysis.runner): an analysis computed by
one is served from the cache to the other, both ways, so the two never disagree on the same weights.

"Served from the cache" is read off the cache database itself: every row keeps the time it was
stored, and a recomputed result would be stored again. The worker must not even load a model for
results the report computed.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT
from webapp.presets import TOY_ROOT

pytestmark = pytest.mark.slow

RECIPE = {"vlm": str(TOY_ROOT / "vlm"), "reasoner": str(TOY_ROOT / "math"), "base": str(TOY_ROOT / "base"),
          "method": "linear", "parameters": {"alpha": 0.9}}
TRIPLE = {k: RECIPE[k] for k in ("vlm", "reasoner", "base")}
NAMES = ("spectra", "similarity", "attention", "changes", "knockout")


@pytest.fixture(autouse=True)
def _toy():
    if not (TOY_ROOT / "vlm" / "config.json").is_file():
        pytest.skip("the bundled toy family is not here")


def rows(cache_dir: Path) -> dict[str, float]:
    """analysis-cache key -> the time its row was stored."""
    with sqlite3.connect(cache_dir / "cache.db") as db:
        return dict(db.execute("SELECT key, store_time FROM Cache").fetchall())


def report(tmp: Path, cache_dir: Path) -> dict:
    recipe = tmp / "recipe.yaml"
    recipe.write_text("\n".join(f"{k}: {v}" for k, v in RECIPE.items() if k != "parameters")
                      + "\nparameters: {alpha: 0.9}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp / "report"
    r = subprocess.run([sys.executable, "-m", "analysis", "report", str(recipe), str(out), "--cache-dir",
                        str(cache_dir), "--knockout", "--knockout-limit", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "report.json").read_text())


def worker_runs(cache_dir: Path):
    """Every analysis through the worker's job path (as the app's panel asks for it)."""
    import torch

    from analysis import cache
    from webapp.worker.process import Worker

    torch.set_num_threads(1)
    cache._shared.clear()
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(cache_dir)})
    outs = {}
    for name in NAMES:
        args = {"name": name, "triple": TRIPLE, "recipe": RECIPE, **({"limit": 1} if name == "knockout" else {})}
        outs[name] = w.call("analysis", args, 1)
    cache._shared.clear()
    return w, outs


def test_report_results_are_served_to_the_app(tmp_path):
    cache_dir = tmp_path / "cache"
    data = report(tmp_path, cache_dir)
    assert set(data["results"]) == set(NAMES) and not data["skipped"]
    before = rows(cache_dir)
    assert len(before) == 6  # one entry per analysis, knockout one per model (VLM, merge)
    w, outs = worker_runs(cache_dir)
    assert rows(cache_dir) == before  # nothing stored again: every result came from the cache
    assert w.models.loaded is None  # and no model was even loaded for it
    assert outs["attention"]["beta"] == data["results"]["attention"]["beta"]
    assert list(json.loads(outs["knockout"]["figures"][0])["data"][0]["y"]) == \
        data["results"]["knockout"]["VLM"]["drop"]["attention"]["perception"]


def test_app_results_are_served_to_the_report(tmp_path):
    cache_dir = tmp_path / "cache"
    _, outs = worker_runs(cache_dir)
    before = rows(cache_dir)
    assert len(before) == 6
    data = report(tmp_path, cache_dir)
    assert rows(cache_dir) == before
    assert data["results"]["attention"]["beta"] == outs["attention"]["beta"]
    assert data["timings_s"]["changes"] < 5  # the merged model was not built
