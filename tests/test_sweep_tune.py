"""`python -m analysis sweep` and `python -m analysis tune` on the smoke family: a sweep's points are the
accuracies of separate disk merges scored by `analysis eval`'s evaluate; a tune continues its study
on a rerun; its front is non-dominated (checked by brute force over every trial)."""

from __future__ import annotations

import json
import math

import optuna
import yaml

from analysis.evaluate import evaluate
from analysis.knob_figures import FRONT_LABEL_AT, tune_figure
from analysis.tune import JOURNAL, STUDY
from merging.engine import merge_to_disk
from merging.recipe import from_dict
from tests.output_checks import cli
from webapp.ui import tune_panel

LIMIT = 3


def _recipe(root) -> dict:
    return {"vlm": str(root / "vlm"), "reasoner": str(root / "math"), "base": str(root / "base"),
            "method": "task_arithmetic", "parameters": {"alpha": 0.5}}


def test_sweep_points_equal_separate_evals_of_the_same_recipes(smoke_family, tmp_path):
    root, _ = smoke_family
    rec = _recipe(root)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    out = tmp_path / "sweep"
    r = cli("sweep", tmp_path / "r.yaml", "--knob", "alpha", "--values", "0,1.5", "--limit", LIMIT, "--out", out,
            module="analysis")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "sweep.json").read_text())
    assert [p["value"] for p in data["points"]] == [0.0, 1.5] and data["knob"] == "alpha"
    assert (out / "sweep.html").stat().st_size > 1000 and "sweep.html" in data["plots"]
    for p in data["points"]:
        folder = tmp_path / f"merged-{p['value']}"
        merge_to_disk(from_dict({**rec, "parameters": {"alpha": p["value"]}}), folder)
        want = evaluate(folder, limit=LIMIT)  # what `python -m analysis eval` prints
        for suite, acc in want.items():
            got = p[suite]
            assert got["n"] == LIMIT and got["k"] == round(acc * LIMIT), (p["value"], suite)
            assert 0 <= got["lo"] <= got["acc"] <= got["hi"] <= 1
    # a knob the method does not have, or a bad value, is refused in one line before any model loads
    r = cli("sweep", tmp_path / "r.yaml", "--knob", "density", "--values", "0,1", "--out", tmp_path / "x",
            module="analysis")
    assert r.returncode == 2 and "density" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("sweep", tmp_path / "r.yaml", "--knob", "alpha", "--values", "0,x", "--out", tmp_path / "x",
            module="analysis")
    assert r.returncode == 2 and "'x'" in r.stderr and not (tmp_path / "x").exists()


def _dominates(a: dict, b: dict) -> bool:
    ka = (a["perception"]["k"], a["visual_math"]["k"])
    kb = (b["perception"]["k"], b["visual_math"]["k"])
    return all(x >= y for x, y in zip(ka, kb)) and ka != kb


def test_tune_resumes_and_its_front_is_non_dominated(smoke_family, tmp_path):
    root, _ = smoke_family
    out = tmp_path / "tune"
    args = ["tune", "--method", "ties", "--family", root, "--limit", LIMIT, "--dev-items", LIMIT,
            "--test-limit", 2, "--out", out]
    r = cli(*args, "--trials", 3, module="analysis")
    assert r.returncode == 0, r.stderr[-2000:]
    first = json.loads((out / "pareto.json").read_text())
    assert first["trials"] == 3
    r = cli(*args, "--trials", 2, module="analysis")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "pareto.json").read_text())
    assert data["trials"] == 5  # the second run continued the study
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / JOURNAL)))
    study = optuna.load_study(study_name=STUDY, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5  # the other start points still wait in the study for a later run
    assert study.trials[0].user_attrs["knobs"] == {"alpha": [1.0, 1.0], "density": [0.5, 0.5]}  # the defaults first
    # the first run's trials are still there, unchanged
    assert [t["knobs"] for t in data["trials_dev"][:3]] == [t["knobs"] for t in first["trials_dev"]]
    trials = data["trials_dev"]
    assert data["front"]
    for p in data["front"]:
        assert not any(_dominates(t["dev"], p["dev"]) for t in trials), p
    # every trial left off the front is dominated by one on it
    on_front = {p["trial"] for p in data["front"]}
    for t in trials:
        if t["trial"] not in on_front:
            assert any(_dominates(p["dev"], t["dev"]) for p in data["front"]), t
    for p in data["front"]:
        for s in ("perception", "visual_math"):
            iv = p["dev"][s]
            assert iv["n"] == LIMIT and math.isclose(iv["acc"], iv["k"] / LIMIT)
    best = data["best"]
    # the chosen point: perception within 3 points of the VLM's on dev, then the most visual_math
    floor = data["vlm_dev"]["perception"]["acc"] - 0.03
    keeping = [p for p in data["front"] if p["dev"]["perception"]["acc"] >= floor - 1e-9]
    if keeping:
        top = max(p["dev"]["visual_math"]["k"] for p in keeping)
        assert best["dev"]["visual_math"]["k"] == top and best["dev"]["perception"]["acc"] >= floor - 1e-9
    assert best["trial"] in on_front and set(best["test"]) == {"perception", "visual_math", "text_math"}
    assert best["test"]["perception"]["n"] == 2
    # the dev items are not the held-out ones
    dev_ids = {json.loads(line)["id"] for line in (out / "dev" / "perception.jsonl").read_text().splitlines()}
    assert all(i.startswith("dev-") for i in dev_ids)
    # other settings on the same folder are refused, naming the one that differs
    r = cli(*[a if a != LIMIT else 2 for a in args], "--trials", 1, module="analysis")
    assert r.returncode == 2 and "limit" in r.stderr


def _iv(k: int, n: int = 10) -> dict:
    return {"k": k, "n": n, "acc": k / n, "lo": max(0.0, k / n - 0.2), "hi": min(1.0, k / n + 0.2)}


def test_a_front_points_hover_names_its_entry_in_the_apps_list():
    """The app loads a front point by a click on it (the point's label, which the page's click hook reads
    from its customdata) or from a list: each front point's hover and label (and the chosen star's) read
    exactly as that point's entry in the list, and its customdata holds its knobs."""
    front = [{"trial": 0, "knobs": {"alpha": 1.0}, "dev": {"perception": _iv(9), "visual_math": _iv(2)}},
             {"trial": 3, "knobs": {"alpha": [0.5, 1.5]}, "dev": {"perception": _iv(8), "visual_math": _iv(6)}}]
    result = {"method": "task_arithmetic", "trials": 4, "front": front, "best": {**front[1], "test": {}},
              "vlm_dev": {"perception": _iv(9), "visual_math": _iv(1)},
              "trials_dev": [*front, {"trial": 1, "knobs": {"alpha": 2.0},
                                      "dev": {"perception": _iv(5), "visual_math": _iv(1)}}]}
    fig = tune_figure(result, in_app=True)
    want = ["trial 0: alpha 1 (dev perception 90  visual_math 20)",
            "trial 3: alpha 0.5 -> 1.5 (dev perception 80  visual_math 60) ★ chosen"]
    assert [label for label, _ in tune_panel.front_choices(result)] == want
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["Pareto front (dev)"].hovertext) == want
    assert list(by_name["chosen (dev)"].hovertext) == want[1:]
    front_data = [list(c) for c in by_name["Pareto front (dev)"].customdata]
    assert [c[FRONT_LABEL_AT] for c in front_data] == want  # what a click sends
    assert [json.loads(c[0]) for c in front_data] == [{"alpha": 1.0}, {"alpha": [0.5, 1.5]}]
    assert [list(c) for c in by_name["chosen (dev)"].customdata] == front_data[1:]
    assert list(by_name["other trials (dev)"].hovertext) == ["alpha 2"]  # no grey copy under a front point
    assert "a point of the front" in by_name["Pareto front (dev)"].hovertemplate
    assert "a point of the front" not in tune_figure(result).data[1].hovertemplate  # the CLI's HTML: no app list
