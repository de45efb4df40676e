"""The lab's state in a URL (webapp.ui.url_state), the merge panel's knob pools (webapp.ui.recipes) and the
walkthrough's steps: pure, no app, no browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from urllib.parse import parse_qsl

import pytest

from merging import methods
from webapp import presets
from webapp.ui import recipes, url_state
from webapp.ui.url_state import LabState, encode, fit, parse
from webapp.ui.walkthrough import STEPS

TOY_DIMS = {"num_layers": 4, "hidden_size": 128}


def _mid(p):
    """An in-range value of a knob that is not its default."""
    if recipes.is_choice(p):
        return int(p.hi) if p.default != p.hi else int(p.lo)
    lo, hi, _ = recipes.slider_range(p, TOY_DIMS["num_layers"], TOY_DIMS["hidden_size"])
    x = lo + (hi - lo) * 0.3
    return int(round(x)) if p.integer else round(x, 3)


@pytest.mark.parametrize("method", methods.names())
def test_every_method_round_trips_through_the_url(method):
    knobs = {p.name: _mid(p) for p in recipes.shown_params(method)}
    if method == "frank":
        knobs["use_prior"] = 1
    state = LabState(method=method, knobs=knobs, layers=(1, 2), tab="spectra")
    query = encode(state, num_layers=4)
    back, notes = parse(dict(parse_qsl(query)))
    assert notes == []
    assert (back.method, back.layers, back.tab) == (method, (1, 2), "spectra")
    hides = recipes.toggle_hides(method, state.prior)
    for name, v in knobs.items():
        if name not in hides:
            assert back.knob(name) == v, name


def test_defaults_leave_the_url_short():
    assert encode(LabState(), num_layers=4) == "method=task_arithmetic&alpha=1"
    assert parse({}) == (LabState(), [])
    state = LabState(preset=presets.PRESETS[1].label, layers=(0, 3))
    assert encode(state, num_layers=4) == "preset=llava-next-8b-dart-math-prop2diff&method=task_arithmetic&alpha=1"


@pytest.mark.parametrize("method", methods.names())
def test_each_knob_outside_its_param_range_is_named_and_left_at_its_default(method):
    for p in methods.get(method).params:
        for bad in (p.lo - 1, p.hi + 1):
            state, notes = parse({"method": method, p.name: str(bad)})
            assert state.method == method and p.name not in state.knobs
            assert len(notes) == 1 and notes[0].startswith(f"`{p.name}`") and "outside" in notes[0], notes
        state, notes = parse({"method": method, p.name: "abc"})
        assert p.name not in state.knobs and f"`{p.name}`" in notes[0] and "not a number" in notes[0]
        if p.integer:
            state, notes = parse({"method": method, p.name: str(p.lo + 0.5)})
            assert p.name not in state.knobs and "whole number" in notes[0]


@pytest.mark.parametrize("query, name, says", [
    ({"method": "nonsense"}, "method", "not a merge method"),
    ({"method": "nonsense", "alpha": "0.2"}, "method", "using task_arithmetic"),
    ({"preset": "nope"}, "preset", "not a preset"),
    ({"tab": "<b>x</b>"}, "tab", "not one of"),
    ({"layers": "3-1"}, "layers", "FIRST-LAST"),
    ({"layers": "a-b"}, "layers", "FIRST-LAST"),
    ({"alpha": "nan"}, "alpha", "not a number"),
    ({"alpha": "inf"}, "alpha", "not a number"),
    ({"alpha": "1e999"}, "alpha", "not a number"),
    ({"rank": "8"}, "rank", "not a knob of task_arithmetic"),
    ({"vlm": "a", "reasoner": "b"}, "vlm", "needs all three"),
    ({"vlm": "a", "reasoner": "b", "base": "c"}, "vlm", "--models-root"),
    ({"alpha": "1" * 400}, "alpha", "longer than"),
])
def test_bad_parameters_give_a_message_naming_them_and_the_defaults(query, name, says):
    state, notes = parse(query)
    assert len(notes) == 1, notes
    assert notes[0].startswith(f"`{name}`") and says in notes[0], notes
    assert state.method == "task_arithmetic" and state.knobs == {}
    assert state.preset == presets.DEFAULT and state.layers is None and state.tab == "chat"


def test_gradios_own_parameters_are_left_alone():
    assert parse({"__theme": "dark", "method": "linear"}) == (LabState(method="linear"), [])


def test_messages_quote_user_text_as_code():
    _, notes = parse({"preset": "[click](http://x) `y`\n# head"})
    assert "(http://x)" in notes[0] and "`[click](http://x) y # head`" in notes[0]  # one code span: no link


def test_model_paths_must_stay_inside_the_models_root():
    root = "/srv/models"
    ok, notes = parse({"vlm": "toy/vlm", "reasoner": "/srv/models/math", "base": "Qwen/Qwen2-7B"}, root)
    assert notes == [] and ok.preset == presets.CUSTOM and (ok.vlm, ok.reasoner) == ("toy/vlm", "/srv/models/math")
    for bad in ("../etc", "toy/../../etc", "/etc/passwd", "/srv/models-other/x", "a\x00b"):
        state, notes = parse({"vlm": bad, "reasoner": "math", "base": "base"}, root)
        assert state.preset == presets.DEFAULT, bad
        assert notes and notes[0].startswith("`vlm`"), (bad, notes)
    state, notes = parse({"preset": "toy-family", "vlm": "x"}, root)
    assert state.preset == presets.DEFAULT and "ignored" in notes[0]


def test_old_knob_names_are_read_as_the_new_ones():
    aliased = [(m, p) for m in methods.names() for p in methods.get(m).params if p.aliases]
    for m, p in aliased:
        state, notes = parse({"method": m, p.aliases[0]: str(p.default)})
        assert notes == [] and state.knobs == {p.name: p.default}


def test_fit_clamps_to_the_models_sizes_and_says_so():
    state, _ = parse({"method": "ip_merging", "rank": "4096", "layers": "0-9"})
    fitted, notes = fit(state, TOY_DIMS)
    assert fitted.knobs["rank"] == 128 and fitted.layers is None
    assert any(n.startswith("`rank`") and "hidden size" in n and "128" in n for n in notes)
    assert any(n.startswith("`layers`") for n in notes)
    same, notes = fit(state, None)  # sizes not known: the Param range only (rank 4096 is in 1..8192)
    assert same.knobs["rank"] == 256 and "slider" in notes[0]
    state, _ = parse({"method": "layer_swap", "base_layer_num": "7"})
    assert fit(state, TOY_DIMS)[0].knobs["base_layer_num"] == 3


def test_choice_knobs_are_radios_with_a_label_per_value():
    seen = set()
    for m in methods.names():
        for p in methods.get(m).params:
            if recipes.is_choice(p):
                seen.add(p.name)
                opts = recipes.choices(p)
                assert [v for _, v in opts] == list(range(int(p.lo), int(p.hi) + 1))
                assert all(label != str(v) for label, v in opts), (m, p.name)  # a real label each
    assert {"normalize", "br2v", "svd", "similarity", "use_prior"} <= seen
    # the pools: sliders for numbers, radios for choices, and the values back in shown order
    shown = [p.name for p in recipes.shown_params("ip_merging")]
    order = recipes.in_shown_order("ip_merging", [1, 2, 3, 4, 5], ["a", "b"])
    assert dict(zip(shown, order)) == {"threshold": 1, "top_fraction": 2, "rank": 3, "lam": 4, "temperature": 5,
                                       "svd": "a", "similarity": "b"}


def test_integer_sliders_are_capped_by_the_models_sizes():
    rank = methods.get("ip_merging").param("rank")
    assert recipes.slider_range(rank, 4, 128)[1] == 128
    assert recipes.slider_range(rank, 32, 4096)[1] == 4096
    assert recipes.slider_range(rank, 32, 99999)[1] == rank.hi
    assert recipes.slider_range(rank)[1] == recipes.CAP


def test_walkthrough_steps_are_valid_states():
    assert 6 <= len(STEPS) <= 8
    for step in STEPS:
        state, notes = parse(step.query)
        assert notes == [], (step.title, notes)
        assert fit(state, TOY_DIMS)[1] == []
        assert state.preset == presets.DEFAULT  # the bundled family
        assert 2 <= len(re.findall(r"(?<!Fig)[.!?](?:\s|$)", step.text)) <= 3, step.title
    assert {s.query["method"] for s in STEPS} >= {"task_arithmetic", "ip_merging", "frank"}
    assert {s.query["tab"] for s in STEPS} >= {"similarity", "spectra", "attention", "knockout", "drift"}


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_the_browsers_encoder_writes_what_encode_writes():
    """The page's js (url_state.encoder_js) against encode(), in node with a stub history."""
    cases = []
    for m in methods.names():
        nums = [(p.name, _mid(p)) for p in recipes.numeric_params(m)]
        chs = [(p.name, _mid(p)) for p in recipes.choice_params(m)]
        knobs = dict(nums + chs)
        prior = m == "frank"
        if prior:
            knobs["use_prior"] = 1
        per_layer = "alpha: [1.2, 0.3]" if m == "task_arithmetic" else ""
        state = LabState(method=m, knobs=knobs, layers=(1, 3), tab="knockout", per_layer=per_layer)
        pool = ([v for _, v in nums] + [None] * (recipes.SLIDERS - len(nums))
                + [v for _, v in chs] + [None] * (recipes.CHOICES - len(chs)))
        args = [presets.DEFAULT, "", "", "", m, prior, 1, 3, "4", "knockout", per_layer, *pool]
        cases.append((encode(state, 4), args))
    custom = LabState(preset=presets.CUSTOM, vlm="a b/vlm", reasoner="math", base="base")
    cases.append((encode(custom, 4), [presets.CUSTOM, "a b/vlm", "math", "base", "task_arithmetic", False, 0, 3, "4",
                                      "chat", "  ", 1.0] + [None] * (recipes.SLIDERS + recipes.CHOICES - 1)))
    script = ("const out = []; globalThis.location = {pathname: '/', search: ''};"
              "globalThis.history = {state: null, replaceState: (s, t, u) => out.push(u)};"
              f"const f = {url_state.encoder_js().strip()};"
              f"for (const args of {json.dumps([a for _, a in cases])}) f(...args);"
              "console.log(JSON.stringify(out));")
    got = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout)
    assert got == ["?" + q for q, _ in cases]


def test_a_per_layer_schedule_travels_in_the_link_and_bad_ones_are_named():
    """A tuned schedule (the per-layer box) round-trips through encode and parse; text that is not a mapping
    of the method's per-layer knobs to lists of numbers is named in a note and left out, never raised."""
    state = LabState(method="task_arithmetic", knobs={"alpha": 1.0}, per_layer="alpha: [1.2055, 0.29]")
    query = dict(parse_qsl(encode(state, 8)))
    assert query["per_layer"] == "alpha: [1.2055, 0.29]"
    back, notes = parse(query)
    assert notes == [] and back.per_layer == "alpha: [1.2055, 0.29]" and back.knobs == {"alpha": 1.0}
    for text, why in (("alpha: [1, x]", "is not a per-layer knob of task_arithmetic with a list of numbers"),
                      ("rank: [1, 2]", "`rank` is not a per-layer knob"), ("[1, 2]", "is not a mapping"),
                      ("alpha: [1, 2", "per_layer")):
        got, notes = parse({"method": "task_arithmetic", "per_layer": text})
        assert got.per_layer == "" and len(notes) == 1 and notes[0].startswith("`per_layer`: "), (text, notes)
        assert why in notes[0], (text, notes)
