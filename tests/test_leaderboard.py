"""The method leaderboard: dev split disjoint from the eval suites; every method ranked (smoke family)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from PIL import Image

from analysis import leaderboard
from analysis.evaluate import evaluate
from merging import methods
from merging.engine import merge_to_disk
from merging.errors import LabError
from merging.recipe import from_dict
from tests.output_checks import cli
from tests.paths import TOY


def test_dev_split_is_disjoint_from_the_eval_suites():
    dev = leaderboard.build_dev_split(40, TOY / "eval")
    assert {k: len(v) for k, v in dev.items()} == {"perception": 40, "visual_math": 40, "text_math": 40}
    eval_pixels, eval_texts = set(), set()
    for suite in ("perception", "visual_math", "text_math"):
        for line in (TOY / "eval" / f"{suite}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["image"]:
                with Image.open(TOY / "eval" / row["image"]) as im:
                    eval_pixels.add(hashlib.md5(im.convert("RGB").tobytes()).hexdigest())
            else:
                eval_texts.add(row["question"])
    for suite in ("perception", "visual_math"):
        pixels = [hashlib.md5(r["pil"].tobytes()).hexdigest() for r in dev[suite]]
        assert len(set(pixels)) == len(pixels) and not set(pixels) & eval_pixels
    texts = [r["question"] for r in dev["text_math"]]
    assert len(set(texts)) == len(texts) and not set(texts) & eval_texts
    again = leaderboard.build_dev_split(40, TOY / "eval")
    assert [r["question"] for r in again["perception"]] == [r["question"] for r in dev["perception"]]


def test_selection_rule_prefers_visual_math_within_the_perception_bound():
    floor = 0.70
    keep = {"perception": 0.72, "visual_math": 0.20}
    lose = {"perception": 0.40, "visual_math": 0.60}
    assert leaderboard.better(keep, lose, floor) and not leaderboard.better(lose, keep, floor)
    more = {"perception": 0.71, "visual_math": 0.30}
    assert leaderboard.better(more, keep, floor)
    # nobody keeps perception: the best sum wins
    assert leaderboard.better({"perception": 0.5, "visual_math": 0.4}, {"perception": 0.6, "visual_math": 0.1}, floor)


def test_leaderboard_on_the_smoke_family_ranks_every_method(smoke_family, tmp_path):
    smoke_family, _ = smoke_family
    out = tmp_path / "lb"
    cmd = ["leaderboard", "--family", smoke_family, "--limit", "2", "--dev-items", "2", "--grid-size", "1",
           "--out-dir", out]
    r = cli(*cmd, module="analysis")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "leaderboard.json").read_text())
    got = [(e["method"], e["label"]) for e in data["entries"]]
    want = [("vlm", "the VLM"), ("reasoner", "the math LLM")]
    want += [(m, label) for m in methods.names()
             for label in ("defaults", "best on dev", *(v for v, _ in methods.get(m).variants(data["num_layers"])))]
    frank = {e["label"]: e for e in data["entries"] if e["method"] == "frank"}
    assert frank["prior clipped"]["knobs"]["prior_form"] == 0 and frank["prior normalized"]["knobs"]["prior_form"] == 1
    assert all("perception" in frank[k]["test"] for k in ("prior clipped", "prior normalized"))
    assert got == want
    table = (out / "leaderboard.md").read_text()
    assert all(f"| {m} |" in table for m in methods.names()) and "| vlm |" in table
    _check_intervals(data["entries"])
    assert " ±" in table.splitlines()[2]
    assert (out / "leaderboard.html").stat().st_size > 1000 and "leaderboard.md" in r.stdout
    # the table printed is the one written
    assert table.strip().splitlines()[2] in r.stdout
    # a second run replaces its own earlier output; a model folder is never overwritten
    r = cli(*cmd, "--methods", "linear", module="analysis")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [e["method"] for e in json.loads((out / "leaderboard.json").read_text())["entries"]][2:] == ["linear"] * 2
    r = cli(*cmd[:-1], smoke_family / "vlm", module="analysis")
    assert r.returncode == 2 and (smoke_family / "vlm" / "config.json").is_file()


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """The roots of (n + z^2) p^2 - (2k + z^2) p + k^2 / n = 0, the score test's bounds."""
    z = 1.959963984540054
    a, b, c = n + z * z, -(2 * k + z * z), k * k / n
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


def _check_intervals(entries: list[dict]) -> None:
    """Each accuracy's interval is Wilson's of its own per-item outcomes; each difference from the VLM is
    the two rows' accuracies apart, inside its interval, and noise exactly when that interval holds 0."""
    vlm = entries[0]
    for e in entries:
        for s, bits in e["correct"].items():
            assert e["test"][s] == pytest.approx(bits.count("1") / len(bits))
            assert e["ci"][s] == pytest.approx(_wilson_by_hand(bits.count("1"), len(bits)), abs=1e-9)
            if e is vlm:
                assert not e["vs_vlm"]
                continue
            d = e["vs_vlm"][s]
            assert d["diff"] == pytest.approx(e["test"][s] - vlm["test"][s])
            assert d["lo"] - 1e-9 <= d["diff"] <= d["hi"] + 1e-9 and d["noise"] == (d["lo"] <= 0 <= d["hi"])


def test_the_scatter_shows_every_point():
    """The y axis reaches the highest visual_math (a point at 55% was cut off by a fixed 40% top)."""
    entries = [{"method": "vlm", "label": "the VLM", "knobs": {}, "test": {"perception": 0.79, "visual_math": 0.03}},
               {"method": "ties", "label": "defaults", "knobs": {}, "test": {"perception": 0.77, "visual_math": 0.55}},
               {"method": "reasoner", "label": "the math LLM", "knobs": {}, "test": {"text_math": 1.0}}]
    fig = leaderboard.scatter({"entries": entries})
    lo, hi = fig.layout.yaxis.range
    ys = [t.y[0] for t in fig.data]
    assert ys == pytest.approx([3.0, 55.0]) and lo < min(ys) and hi > max(ys)


def _pareto(folder, method: str, knobs: dict, num_layers: int) -> None:
    """A tune folder as `analysis tune` leaves it (only the fields a leaderboard row reads are real)."""
    iv = {"k": 1, "n": 2, "acc": 0.5, "lo": 0.1, "hi": 0.9}
    folder.mkdir()
    (folder / "pareto.json").write_text(json.dumps({
        "method": method, "trials": 7, "settings": {"method": method, "num_layers": num_layers},
        "best": {"trial": 4, "knobs": knobs, "dev": {"perception": iv, "visual_math": iv}, "test": {}}}))


def test_a_tuned_row_is_scored_on_the_same_held_out_items(smoke_family, tmp_path):
    """`leaderboard --tuned DIR`: the tune's chosen point is a row, scored here on the held-out items
    every row uses (its accuracy that of the same merge written to disk and evaluated on its own, its
    intervals Wilson's and paired against the VLM). (frism's rows: the every-method test above.)"""
    root, _ = smoke_family
    layers = json.loads((root / "vlm" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    knobs = {"alpha": [0.5, 1.5]}  # a per-layer knob as the tuner searches it: start -> end
    _pareto(tmp_path / "tune", "task_arithmetic", knobs, layers)
    data = leaderboard.run(root, tmp_path / "lb", limit=2, dev_items=2, only=["linear"], grid_size=1,
                           tuned=[tmp_path / "tune"])
    got = [(e["method"], e["label"]) for e in data["entries"]]
    assert got[:4] == [("vlm", "the VLM"), ("reasoner", "the math LLM"), ("linear", "defaults"),
                       ("linear", "best on dev")]
    assert got[-1] == ("task_arithmetic", "tuned (7 trials)")
    row = data["entries"][-1]
    assert row["knobs"] == knobs and row["dev"] == {"perception": 0.5, "visual_math": 0.5}
    rec = {"vlm": str(root / "vlm"), "reasoner": str(root / "math"), "base": str(root / "base"),
           "method": "task_arithmetic", "parameters": knobs}
    merge_to_disk(from_dict(rec), tmp_path / "merged")
    want = evaluate(tmp_path / "merged", limit=2)
    assert {s: round(2 * a) for s, a in row["test"].items()} == {s: round(2 * a) for s, a in want.items()}
    _check_intervals(data["entries"])
    table = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "| task_arithmetic | tuned (7 trials): alpha 0.5 -> 1.5 |" in table
    assert [t.marker.symbol for t in leaderboard.scatter(data).data if "tuned" in t.name] == ["square"]
    # a folder with no pareto.json, or a tune of another model's depth, is refused in one line, naming it
    with pytest.raises(LabError, match="nowhere.*pareto.json"):
        leaderboard.run(root, tmp_path / "lb2", limit=2, only=["linear"], tuned=[tmp_path / "nowhere"])
    _pareto(tmp_path / "deep", "linear", {"alpha": 0.5}, layers + 4)
    with pytest.raises(LabError, match=f"{layers + 4}-layer"):
        leaderboard.run(root, tmp_path / "lb3", limit=2, dev_items=2, only=["linear"], grid_size=1,
                        tuned=[tmp_path / "deep"])
    assert not (tmp_path / "lb2").exists() and not (tmp_path / "lb3").exists()
