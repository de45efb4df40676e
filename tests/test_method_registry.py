"""A method is one file: everything other layers know about it (leaderboard grid, paper, knob toggle,
default flag, diagnostics) comes from its registered class, and no code outside merging/methods/
spells a method's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from analysis import leaderboard
from merging import methods, params
from merging.errors import Cancelled, LabError
from merging.methods import MergeMethod, Paper, Param, TensorSet
from merging.recipe import from_dict
from tests.paths import ROOT
from webapp import protocol
from webapp.ui import glossary, recipes, url_state

SCANNED = ("merging", "analysis", "webapp", "app.py")
# Content, not code: these files name methods on purpose.
EXEMPT = {
    "webapp/ui/walkthrough.py": "the guided steps' texts and links name the method each step teaches",
}


def sources() -> list[Path]:
    """The code scanned: merging/ but its methods/, analysis/, webapp/ and app.py."""
    out = []
    for entry in SCANNED:
        path = ROOT / entry
        out += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [p for p in out if not p.is_relative_to(ROOT / "merging" / "methods")]


def spelled_names(source: str, names: list[str]) -> list[tuple[int, str]]:
    """(line, name) of each string constant that is a method's name, or holds one in quotes (code
    inside a string, such as the page's JavaScript)."""
    alternatives = "|".join(map(re.escape, names))
    quoted = re.compile(rf"""["']({alternatives})["']""")
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in names:
                hits.append((node.lineno, node.value))
            else:
                hits += [(node.lineno, m[1]) for m in quoted.finditer(node.value)]
    return sorted(hits)


def test_the_scan_finds_a_spelled_name_and_leaves_prose_alone():
    names = methods.names()
    code = 'if method == "frank":\n    pass\nJS = """if (method === "ties") go();"""\nx = f"{m} merged"\n'
    assert spelled_names(code, names) == [(1, "frank"), (3, "ties")]
    assert spelled_names('"""frank and ties in a sentence."""\nmsg = "frank w_v = 0.5"\n', names) == []


def test_no_method_name_is_spelled_outside_merging_methods():
    names = methods.names()
    scanned = sources()
    assert ROOT / "webapp" / "ui" / "recipes.py" in scanned and ROOT / "app.py" in scanned
    assert not any(p.is_relative_to(ROOT / "merging" / "methods") for p in scanned)
    found = []
    for path in scanned:
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXEMPT:
            continue
        found += [f"{rel}:{line}: {name!r}" for line, name in spelled_names(path.read_text(), names)]
    assert found == [], "read it from the method's class (merging.methods) instead:\n" + "\n".join(found)


@pytest.mark.parametrize("method", methods.all_methods(), ids=lambda m: m.name)
@pytest.mark.parametrize("num_layers", [2, 4, 32, 80])
def test_every_grid_is_non_empty_and_made_of_the_methods_knobs_in_range(method, num_layers):
    grid = method.grid(num_layers)
    assert grid and all(isinstance(point, dict) and point for point in grid), grid
    specs = {p.name: p for p in method.params}
    for point in grid:
        for name, v in point.items():
            spec = specs.get(name)
            assert spec is not None, f"{method.name}: {name} is not a knob"
            assert spec.lo <= v <= spec.hi, (method.name, name, v)
            assert not spec.integer or float(v).is_integer(), (method.name, name, v)
        # the recipe checks (ranges, whole numbers, cross-knob rules such as frank's w_v xor use_prior)
        from_dict({"vlm": "v", "reasoner": "r", "base": "b", "method": method.name, "parameters": dict(point)})
    assert leaderboard.grid(method.name, num_layers) == grid


def test_a_method_without_a_grid_is_ranked_on_its_defaults_only():
    assert MergeMethod().grid(8) == [{}]


def test_grids_are_the_leaderboards_of_before():
    sparse = [{"alpha": a, "density": d} for a in (0.5, 1.0, 1.5) for d in (0.3, 0.7)]
    assert methods.get("ties").grid(8) == sparse == methods.get("dare_ties").grid(8)
    assert methods.get("dare_linear").grid(8) == [{"alpha": a, "density": 0.5} for a in (0.5, 1.0, 1.5)]
    assert methods.get("layer_swap").grid(8) == [{"alpha": a, "base_layer_num": n} for a in (0.5, 1.0)
                                                  for n in (1, 3, 5)]
    assert methods.get("frank").grid(8)[3:] == [{"use_prior": 1, "beta": b} for b in (0.1, 0.3, 1.0)]


@pytest.mark.parametrize("method", methods.all_methods(), ids=lambda m: m.name)
def test_every_method_has_a_paper_and_the_glossary_links_it(method):
    assert isinstance(method.paper, Paper) and method.paper.short and method.paper.title
    assert re.fullmatch(r"https://arxiv\.org/abs/\d{4}\.\d{5}", method.paper.url), method.paper.url
    assert glossary.PAPERS[method.paper.short] == (method.paper.title, method.paper.url)
    assert glossary.paper_link(method.name) == f"[{method.paper.title}]({method.paper.url})"


def test_exactly_one_method_is_the_default_and_the_app_opens_with_it():
    marked = [m.name for m in methods.all_methods() if m.default]
    assert marked == ["task_arithmetic"]
    assert methods.default_method().name == recipes.DEFAULT_METHOD == url_state.LabState().method


@pytest.mark.parametrize("method", methods.all_methods(), ids=lambda m: m.name)
def test_toggles_name_a_bool_knob_and_hide_only_knobs(method):
    t = method.toggle
    if t is None:
        assert recipes.toggle_hides(method.name, True) == recipes.toggle_hides(method.name, False) == ()
        return
    assert method.param(t.knob).kind is bool and t.label
    for on in (True, False):
        assert set(t.hides(on)) <= {p.name for p in method.params} - {t.knob}
    assert t.knob not in [p.name for p in recipes.shown_params(method.name)]


def test_frank_toggle_keeps_the_prior_checkbox_behaviour():
    t = methods.get("frank").toggle
    assert (t.knob, t.hides(True), t.hides(False)) == ("use_prior", ("w_v",), ("beta", "prior_form"))
    assert url_state.beta_query(0.12345) == {"method": "frank", "use_prior": "1", "beta": "0.1235"}
    triple = {"vlm": "v", "reasoner": "r", "base": "b"}
    on = recipes.build(triple, "frank", [0.3, 0.2], prior=True)["parameters"]
    off = recipes.build(triple, "frank", [0.3, 0.2], prior=False)["parameters"]
    assert on == {"use_prior": 1, "beta": 0.2} and off == {"w_v": 0.3}


def test_resolved_knobs_come_back_as_their_kind():
    p = params.resolve("ties", {"normalize": 1, "br2v": 0}, 0, 4)
    assert p["normalize"] is True and p["br2v"] is False and type(p["alpha"]) is float
    ip = params.resolve("ip_merging", {"rank": [4, 9]}, 1, 4)
    assert type(ip["rank"]) is int and ip["rank"] == 6 and type(ip["svd"]) is int
    assert params.resolve("frank", {"use_prior": 1}, 0, 4)["use_prior"] is True
    assert type(params.resolve("layer_swap", {}, 0, 4)["base_layer_num"]) is int
    with pytest.raises(ValueError, match="kind"):
        Param("x", 0, 0, 1, "", kind=str)
    with pytest.raises(ValueError, match="bool"):
        Param("x", 0, 0, 2, "", kind=bool)


def test_bool_knobs_still_merge_as_before():
    """normalize on vs off on a real ties merge: the divisor is applied only when on."""
    g = torch.Generator().manual_seed(0)
    v, r, b = (torch.randn(8, 8, generator=g) for _ in range(3))
    t = TensorSet("layers.0.mlp.up_proj.weight", 0, v, r, b)
    m = methods.get("ties")

    def run(normalize):
        knobs = {"density": 1.0, "weight_vlm": 0.5, "alpha": 0.5, "normalize": normalize}
        return m.merge_tensor(t, params.resolve(m, knobs, 0, 4), methods.MergeContext(num_layers=4))

    on, off = run(1), run(0)
    # every entry agreeing in sign: the divisor is the summed weights 0.5 + 0.5 = 1, so on == off there
    agree = torch.sign(v - b) == torch.sign(r - b)
    torch.testing.assert_close(on[agree], off[agree])
    # one agreeing model: on divides by its weight 0.5, i.e. doubles the delta
    torch.testing.assert_close((on - b)[~agree], 2 * (off - b)[~agree])


@pytest.mark.parametrize("method", methods.all_methods(), ids=lambda m: m.name)
def test_diagnostics_hooks_with_nothing_recorded_say_nothing(method):
    assert method.summarize_diagnostics({}) == ({}, [])
    assert method.selection_details({}) == ""
    assert method.report_lines({}) == []
    assert method.layer_note({}, "0") == ""


def test_one_cancelled_error():
    assert protocol.Cancelled is Cancelled and issubclass(Cancelled, LabError)
    assert str(Cancelled()) == "cancelled"


def test_every_default_is_the_one_the_docs_state():
    """docs/METHODS.md's "Defaults" table, read as text, against the registry both ways: a default,
    range or knob changed, added or removed in code without the docs fails here."""
    import re

    from merging import methods

    text = (ROOT / "docs" / "METHODS.md").read_text()
    section = text.split("## Defaults", 1)[1].split("\n## ", 1)[0]
    doc = {(m, k): (float(d), float(lo), float(hi)) for m, k, d, lo, hi in
           re.findall(r"^\| (\w+) \| `(\w+)` \| (-?[\d.]+) \| (-?[\d.]+) \.\. (-?[\d.]+) \|$", section, re.M)}
    code = {(n, p.name): (float(p.default), float(p.lo), float(p.hi))
            for n in methods.names() for p in methods.get(n).params}
    assert doc.keys() == code.keys(), sorted(doc.keys() ^ code.keys())
    for key, want in code.items():
        assert doc[key] == pytest.approx(want), key
