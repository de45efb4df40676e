"""The bundled family's knockout and leaderboard, shipped precomputed (assets/toy/precomputed): they are
served for the app's default settings and only for them (other settings, other bytes of the weights,
an edited file: computed live), their keys follow file contents, not paths or times, what they hold
renders in the panels, and the command that makes them writes files the worker then serves, equal
to a live computation at the same (tiny) settings."""

from __future__ import annotations

import json
import math
import queue
import shutil

import pytest
import torch

from analysis import analyses, leaderboard, precomputed, runner
from analysis.evaluate import SUITES, evaluate, load_model
from merging.errors import Cancelled
from tests.paths import TOY
from webapp.ui import leaderboard_panel, shipped
from webapp.worker.process import Worker

pytestmark = pytest.mark.skipif(not (TOY / "vlm" / "config.json").is_file(), reason="no bundled toy family")
Z = 1.959963984540054
TRIPLE = {"vlm": str(TOY / "vlm"), "reasoner": str(TOY / "math"), "base": str(TOY / "base")}


def _wilson(k: int, n: int) -> tuple[float, float]:
    """The score interval's bounds, solved by hand: (n + z^2) p^2 - (2k + z^2) p + k^2 / n = 0."""
    a, b, c = n + Z * Z, -(2 * k + Z * Z), k * k / n
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


def _knockout_key(vlm: str, limit: int = 40, eval_dir=TOY / "eval") -> dict:
    job = runner.Job((vlm, TRIPLE["reasoner"], TRIPLE["base"]), None, None, eval_dir=eval_dir)
    a = analyses.get("knockout")
    return a.key(job, False, a.params({"limit": limit}))


def test_the_shipped_files_are_the_apps_defaults_today():
    """Stale files (new weights, eval items or defaults) would never be served: regenerate them."""
    lb, ko = shipped.leaderboard_default(), shipped.analysis_default("knockout")
    assert lb is not None and ko is not None, "assets/toy/precomputed is stale: run python -m tools.precompute"
    assert ko["key_parts"]["limit"] == analyses.get("knockout").params({})["limit"] == 40
    assert lb["key_parts"]["methods"] and lb["key_parts"]["limit"] == 30
    for e in (lb, ko):
        assert e["command"].startswith("python -m tools.precompute") and e["seconds"] > 0 and e["date"][:2] == "20"
        assert "Precomputed" in shipped.status(e, "Run") and e["items"] in shipped.status(e, "Run")


def test_the_shipped_leaderboard_renders_with_its_intervals():
    data = shipped.leaderboard_default()["data"]
    rows = leaderboard_panel.table(data)
    assert list(rows.columns) == leaderboard_panel.COLUMNS and len(rows) == len(data["entries"])
    assert {"vlm", "reasoner", *shipped.leaderboard_default()["key_parts"]["methods"]} <= set(rows["method"])
    assert leaderboard.scatter(data).data  # the panel's plot
    vlm = data["entries"][0]
    for e in data["entries"]:
        for s, bits in e["correct"].items():
            assert len(bits) == 30 and s in SUITES
            lo, hi = _wilson(bits.count("1"), len(bits))
            assert e["ci"][s] == pytest.approx([lo, hi], abs=1e-9)
            assert e["test"][s] == pytest.approx(bits.count("1") / 30)
            if e is not vlm and s in vlm["correct"]:
                d = e["vs_vlm"][s]
                assert d["lo"] <= d["diff"] <= d["hi"] and d["noise"] == (d["lo"] <= 0 <= d["hi"])


def test_the_shipped_knockout_renders_with_its_intervals():
    e = shipped.analysis_default("knockout")
    figs, summary = shipped.analysis_view("knockout", e)
    assert len(figs) == 1 and figs[0].data and "40 eval item(s) per suite" in summary
    ko = e["data"]
    assert ko["n"] == {s: 40 for s in SUITES} and ko["layers"] == list(range(len(ko["layers"])))
    for s in SUITES:
        lo, hi = _wilson(round(ko["baseline"][s] * 40), 40)
        assert ko["baseline_ci"][s] == pytest.approx([lo, hi], abs=1e-9)
        for g in ko["groups"]:
            assert len(ko["drop_ci"][g][s]) == len(ko["layers"])


def test_keys_follow_the_bytes_not_the_path_and_anything_else_is_refused(tmp_path):
    """A copy of the VLM elsewhere (new path, new times) gets the shipped result; one changed byte,
    another limit, other eval items or an edited file do not."""
    copy = tmp_path / "vlm"
    shutil.copytree(TOY / "vlm", copy, copy_function=shutil.copy)  # copy: new modification times
    assert precomputed.find("knockout", _knockout_key(str(copy))) is not None
    assert precomputed.find("knockout", _knockout_key(str(copy), limit=39)) is None
    evals = tmp_path / "eval"
    shutil.copytree(TOY / "eval", evals)
    with (evals / "text_math.jsonl").open("a") as f:
        f.write("\n")
    assert precomputed.find("knockout", _knockout_key(str(copy), eval_dir=evals)) is None
    weights = max(copy.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(raw))
    assert precomputed.find("knockout", _knockout_key(str(copy))) is None
    assert shipped.analysis_entry("knockout", {**TRIPLE, "vlm": str(copy)}, None, {}) is None
    # a merge in the tab: its knockout is never the VLM's shipped one
    assert shipped.analysis_entry("knockout", TRIPLE, {"method": "linear"}, {}) is None
    lb = shipped.leaderboard_default()
    args = {**{k: lb["key_parts"][k] for k in ("limit", "dev_items", "grid_size")}, "methods": lb["key_parts"]["methods"]}
    assert shipped.leaderboard_entry(args) is not None
    assert shipped.leaderboard_entry({**args, "grid_size": 1}) is None
    assert shipped.leaderboard_entry({**args, "methods": args["methods"][:-1]}) is None
    # a file whose key parts were edited but not its key: refused
    edited = json.loads((precomputed.FOLDER / "knockout.json").read_text())
    edited["key_parts"]["limit"] = 39
    (tmp_path / "ship").mkdir()
    (tmp_path / "ship" / "knockout.json").write_text(json.dumps(edited))
    assert precomputed.find("knockout", _knockout_key(str(TOY / "vlm"), limit=39), tmp_path / "ship") is None
    assert precomputed.find("knockout", _knockout_key(str(TOY / "vlm")), tmp_path / "ship") is None


def test_the_shipped_leaderboard_holds_the_vlms_live_answers():
    """The VLM scored now, item by item, on the first 8 items of each suite: the leaderboard's VLM row
    has the same outcomes there (its other rows come from the same scoring of merged weights)."""
    torch.set_num_threads(1)
    out = evaluate(load_model(TOY / "vlm"), limit=8, return_items=True)
    vlm = next(e for e in shipped.leaderboard_default()["data"]["entries"] if e["method"] == "vlm")
    for s in SUITES:
        assert vlm["correct"][s][:8] == "".join("1" if r["correct"] else "0" for r in out["items"][s])


def _refused(worker: Worker, kind: str, args: dict) -> bool:
    """Whether the job went to compute: it is cancelled before it starts, so computing stops at its
    first step (a served result never gets there)."""
    worker.cancelled.add(99)
    try:
        worker.call(kind, args, 99)
    except Cancelled:
        return True
    finally:
        worker.cancelled.discard(99)
    return False


def test_the_worker_serves_the_shipped_files_only_at_their_settings(tmp_path):
    worker = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path)})
    lb = shipped.leaderboard_default()
    args = {k: lb["key_parts"][k] for k in ("limit", "dev_items", "grid_size", "methods")}
    got = worker.call("leaderboard", args)
    assert got["precomputed"] and lb["items"] in got["precomputed"] and got["cached"]
    assert [e["correct"] for e in got["result"]["entries"]] == [e["correct"] for e in lb["data"]["entries"]]
    ko = {"name": "knockout", "triple": TRIPLE, "recipe": None, "limit": 40}
    served = worker.call("analysis", ko)
    assert len(served["precomputed"]) == 1 and "40 eval item(s)" in served["summary"]
    assert worker.models.loaded is None  # nothing was loaded to serve them
    assert _refused(worker, "leaderboard", {**args, "live": True})
    assert _refused(worker, "leaderboard", {**args, "dev_items": 19})
    assert _refused(worker, "analysis", {**ko, "live": True})
    assert _refused(worker, "analysis", {**ko, "limit": 39})


@pytest.mark.slow
def test_the_command_regenerates_in_process_what_a_live_run_gives(tmp_path, monkeypatch):
    """At a tiny limit: the file it writes is served by the worker for that limit, with the numbers a
    live run (another worker, another cache) computes."""
    from tools import precompute

    torch.set_num_threads(1)  # the toy model gains nothing from more, and shared cores lose a lot
    out = tmp_path / "ship"
    assert precompute.main(["--out", str(out), "--only", "knockout", "--knockout-limit", "1"]) == 0
    e = json.loads((out / "knockout.json").read_text())
    assert e["command"] == f"python -m tools.precompute --out {out} --only knockout --knockout-limit 1"
    assert e["items"] == "1 items per suite" and e["key_parts"]["limit"] == 1 and e["seconds"] > 0
    monkeypatch.setattr(precomputed, "FOLDER", out)
    serving = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path / "a")})
    live = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path / "b")})
    args = {"name": "knockout", "triple": TRIPLE, "recipe": None, "limit": 1}
    served = serving.call("analysis", args)
    fresh = live.call("analysis", {**args, "live": True})
    assert len(served["precomputed"]) == 1 and fresh["precomputed"] == []
    # the same numbers: the file holds the live result's JSON, read back exactly
    assert fresh["summary"] == served["summary"] and fresh["figures"] == served["figures"]
