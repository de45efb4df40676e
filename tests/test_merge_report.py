"""Every merge reports what it changed; a merge that changes nothing says so."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from merging import merge_report
from merging.errors import LabError
from merging.inplace import InPlaceMerger
from merging.recipe import from_dict
from tests.factories import make_tiny_triple


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    tri = make_tiny_triple(tmp_path_factory.mktemp("rep"), num_layers=3)
    model = LlavaForConditionalGeneration.from_pretrained(tri["vlm"])
    return tri, InPlaceMerger(model, str(tri["vlm"]), str(tri["reasoner"]), str(tri["base"]))


def recipe(tri, method, knobs, **extra):
    return from_dict({"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"]),
                      "method": method, "parameters": knobs, **extra})


def read(folder, prefix):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118


def test_task_arithmetic_relative_change_per_layer_from_the_checkpoints(setup):
    tri, merger = setup
    alpha = 0.4
    rep = merger.apply(recipe(tri, "task_arithmetic", {"alpha": alpha}, layers=[1, 2]))["report"]
    merger.restore()
    v = read(tri["vlm"], "language_model.model.")
    r, b = read(tri["reasoner"], "model."), read(tri["base"], "model.")
    for layer in (1, 2):
        names = [n for n in v if n.startswith(f"layers.{layer}.")]
        num = sum(float((alpha * (r[n].double() - b[n].double())).square().sum()) for n in names)
        den = sum(float(v[n].double().square().sum()) for n in names)
        assert rep["relative_change"][str(layer)] == pytest.approx(math.sqrt(num / den), rel=1e-4)
    assert "0" not in rep["relative_change"]  # out of scope: not merged, not reported
    want = sorted(f"layers.{i}.{n.split('.', 2)[2]}" for i in (1, 2) for n in v if n.startswith(f"layers.{i}.")
                  if not torch.equal(r[n], b[n]))
    assert rep["changed"] == want and rep["in_scope"] == len(want) and rep["warnings"] == []


def test_apply_returns_the_recorded_diagnostics_and_the_live_merge_keeps_them(setup):
    """apply's dict: the method's store, the change sums (||W_v||^2 from the checkpoint) and the
    report; the merger keeps them while the merge is live and shows none once the VLM is back."""
    tri, merger = setup
    extra = merger.apply(recipe(tri, "ties", {"density": 0.5, "alpha": 0.7}, layers=[1, 1]))
    assert set(extra) == {"gta", "changes", "report"} and set(extra["gta"]) == {"1"}
    assert merger.diagnostics.report == extra["report"] and merger.diagnostics.methods["gta"] == extra["gta"]
    v = read(tri["vlm"], "language_model.model.")
    assert set(extra["changes"]) == {n for n in v if n.startswith("layers.1.")}
    for n, e in extra["changes"].items():
        assert e["layer"] == 1 and e["ref2"] == pytest.approx(float(v[n].double().square().sum()), rel=1e-4)
    merger.restore()
    assert merger.diagnostics.as_dict() == {} and merger.diagnostics.report is None


def test_a_no_op_merge_warns_and_names_the_knob(setup):
    tri, merger = setup
    rep = merger.apply(recipe(tri, "ip_merging", {"threshold": 1.0, "top_fraction": 0}))["report"]
    merger.restore()
    ip = rep["diagnostics"]["ip_merging"]
    assert rep["changed"] == [] and ip["selected"] == 0 and ip["matrices"] == 3 * 7
    assert ip["scores"]["max"] < 1.0 and ip["scores"]["min"] <= ip["scores"]["median"] <= ip["scores"]["max"]
    lines = merge_report.summary_lines(rep)
    warn = [x for x in lines if x.startswith("warning: ")]
    assert any("selected no matrix" in x and "threshold 1.00" in x and "top_fraction" in x for x in warn)
    assert any("changed nothing" in x and "(top_fraction is 0" in x for x in warn)  # the knob at 0 named


def test_top_fraction_selects_and_reports(setup):
    tri, merger = setup
    rep = merger.apply(recipe(tri, "ip_merging", {"top_fraction": 0.5, "rank": 4}))["report"]
    merger.restore()
    ip = rep["diagnostics"]["ip_merging"]
    assert ip["selected_per_layer"] == {"0": 4, "1": 4, "2": 4}  # ceil(0.5 * 7) per layer
    assert ip["rule"] == "top_fraction" and ip["threshold"] is None
    # the tiny triple's task vectors are independent random draws: their scores are chance, and said to be
    assert len(rep["changed"]) == 12 and [w for w in rep["warnings"] if "near chance" not in w] == []
    assert len(rep["warnings"]) == 1 and ip["chance"]["median_ratio"] < 1.5


def test_a_threshold_the_recipe_sets_is_never_overridden(setup):
    """{threshold: 0.99} alone used to be ignored (the default top_fraction 0.5 still merged half the
    matrices): now it is refused, and with use_threshold: 1 it is the rule."""
    tri, merger = setup
    with pytest.raises(LabError, match=r"^ip_merging: 'threshold' applies only with use_threshold: 1"):
        recipe(tri, "ip_merging", {"threshold": 0.99})
    with pytest.raises(LabError, match=r"^ip_merging: 'top_fraction' means nothing with use_threshold: 1"):
        recipe(tri, "ip_merging", {"use_threshold": True, "top_fraction": 0.5})
    rep = merger.apply(recipe(tri, "ip_merging", {"use_threshold": 1, "threshold": 0.99, "rank": 4}))["report"]
    merger.restore()
    ip = rep["diagnostics"]["ip_merging"]
    assert ip["rule"] == "threshold" and ip["threshold"] == 0.99 and ip["selected"] == 0 and rep["changed"] == []
    rep = merger.apply(recipe(tri, "ip_merging", {"use_threshold": 1, "threshold": 0.0, "rank": 4}))["report"]
    merger.restore()
    assert rep["diagnostics"]["ip_merging"]["selected"] == 21  # every score >= 0


def test_frank_reports_its_prior(setup):
    tri, merger = setup
    rep = merger.apply(recipe(tri, "frank", {"use_prior": 1, "beta": 0.5}))["report"]
    merger.restore()
    fr = rep["diagnostics"]["frank"]
    assert [fr[str(i)]["w_v"] for i in range(3)] == pytest.approx([1.0, math.exp(-0.5), math.exp(-1.0)])


def test_merge_command_writes_the_report_and_warns_on_a_no_op(setup, tmp_path):
    import json

    from tests.output_checks import cli

    tri, _ = setup
    runs = {}
    for name, knobs in (("noop", "{threshold: 1.0, top_fraction: 0}"), ("some", "{top_fraction: 0.5}")):
        rec = tmp_path / f"{name}.yaml"
        rec.write_text(f"vlm: {tri['vlm']}\nreasoner: {tri['reasoner']}\nbase: {tri['base']}\n"
                       f"method: ip_merging\nparameters: {knobs}\n")
        r = cli("merge", rec, tmp_path / name, "--no-progress")
        assert r.returncode == 0, r.stderr
        runs[name] = (r.stdout, json.loads((tmp_path / name / "merge_report.json").read_text()))
    out, rep = runs["noop"]
    assert rep["changed"] == [] and set(rep) >= {"changed", "relative_change", "diagnostics", "warnings"}
    assert any(line.startswith("warning: ip_merging selected no matrix") for line in out.splitlines())
    out, rep = runs["some"]
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(rep["changed"]) == 12 and len(warned) == 1 and "near chance" in warned[0]  # random task vectors
    assert "similarity min" in out and "relative norm change" in (tmp_path / "some" / "README.md").read_text()


def test_ties_reports_kept_fraction_and_sign_conflicts(setup):
    """Against a count written out here: top-k trim per tensor, then entries of opposite sign."""
    tri, merger = setup
    density = 0.3
    rep = merger.apply(recipe(tri, "ties", {"density": density, "alpha": 0.7}))["report"]
    merger.restore()
    v = read(tri["vlm"], "language_model.model.")
    r, b = read(tri["reasoner"], "model."), read(tri["base"], "model.")
    entries = kept = conflicts = 0
    for n in (n for n in v if n.startswith("layers.1.")):
        t0, t1 = (v[n] - b[n]).flatten(), (r[n] - b[n]).flatten()
        k = int(density * t0.numel())
        keep0 = torch.zeros_like(t0, dtype=torch.bool)
        keep1 = torch.zeros_like(t1, dtype=torch.bool)
        if k:
            keep0[t0.abs().argsort(descending=True)[:k]] = True
            keep1[t1.abs().argsort(descending=True)[:k]] = True
        keep0 &= t0 != 0
        keep1 &= t1 != 0
        entries += t0.numel()
        kept += int(keep1.sum())
        conflicts += int((keep0 & keep1 & (torch.sign(t0) != torch.sign(t1))).sum())
    layer = rep["diagnostics"]["gta"]["per_layer"]["1"]
    assert layer["kept_reasoner"] == pytest.approx(kept / entries, abs=1e-6)
    lost = rep["diagnostics"]["gta"]["per_layer"]["1"]["conflicts"]
    kept_all = (layer["kept_vlm"] + layer["kept_reasoner"]) * entries
    assert lost * kept_all == pytest.approx(conflicts, abs=0.5)
    assert conflicts > 0  # the tiny triple's task vectors do disagree somewhere
    assert any("lost the sign vote" in line for line in merge_report.summary_lines(rep))


def test_merge_report_figure_draws_the_reported_numbers(setup):
    from analysis.figures import merge_report_figure

    tri, merger = setup
    rep = merger.apply(recipe(tri, "ip_merging", {"top_fraction": 0.5, "rank": 4}))["report"]
    merger.restore()
    bar = merge_report_figure(rep).data[0]
    layers = [k for k in rep["relative_change"] if k != "other"]
    assert list(bar.y[: len(layers)]) == [rep["relative_change"][k] for k in layers]
    assert "ip_merging merged 4 matrices" in bar.hovertext[0]
