"""Teaching features in the real app and a real headless Chromium: the state in the page's URL (restored
from a link, rewritten as the controls change, bad parameters named), the walkthrough's steps, and
the merge panel's knobs (choices as radios, frank's beta only with its prior, rank capped at the
hidden size, a clamped typed value reported, no stale export line).

Screenshots go to tests/_output/teaching_*.png. The app runs with --models-root at the toy family's
folder, so a link may name a custom triple by folder. Needs /usr/bin/chromium (see test_app_browser).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from analysis import analyses
from tests.app_fixtures import SHOTS, chromium, start_app, stop_app
from webapp import presets
from webapp.ui import recipes, url_state
from webapp.ui.walkthrough import STEPS

pytestmark = [pytest.mark.slow, pytest.mark.browser]

OUT = SHOTS
WAIT = 60_000


@pytest.fixture(scope="module")
def app(toy_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teaching")
    proc, url = start_app(toy_dir, tmp / "cache", tmp / "app.log", ["--models-root", str(toy_dir)])
    yield url, toy_dir
    stop_app(proc)


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def open_page(app, browser):
    """open_page(query) -> a fresh page (its own session) at the app's URL with that query, loaded."""
    from playwright.sync_api import expect

    pages = []

    def _open(query: str = ""):
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(WAIT)
        pages.append(pg)
        pg.goto(app[0] + (f"?{query}" if query else ""))
        expect(pg.locator("#device-line")).to_contain_text("Worker", timeout=90_000)
        return pg

    yield _open
    for pg in pages:
        pg.close()


def url_query(page) -> dict:
    return dict(parse_qsl(urlsplit(page.url).query))


def wait_query(page, condition: str) -> None:
    """Wait until the page's URL query `q` (URLSearchParams) satisfies the JavaScript `condition`:
    the URL is rewritten after the controls settle, so reading it at once races with that."""
    page.wait_for_function(f"() => {{ const q = new URLSearchParams(location.search); return {condition}; }}")


def method_of(page) -> str:
    return page.locator("#merge-method input").input_value()


def knob(page, i: int):
    return page.locator(f"#knob-{i} input[type=number]")


def choice(page, i: int) -> str:
    return page.locator(f"#choice-{i} input:checked").get_attribute("value")


def pick_method(page, name: str) -> None:
    page.locator("#merge-method input").click()
    page.get_by_role("option", name=name, exact=True).click()


def selected_tabs(page) -> list[str]:
    return [t.inner_text().strip() for t in page.get_by_role("tab").all() if t.get_attribute("aria-selected") == "true"]


def expect_tab(page, tab: str) -> None:
    """The view a state's `tab` names is the one shown."""
    from playwright.sync_api import expect

    if tab in ("chat", "drift"):
        expect(page.get_by_role("tab", name="3 · Chat")).to_have_attribute("aria-selected", "true")
        if tab == "drift":
            expect(page.locator("#drift-btn")).to_be_visible()
        return
    if tab in url_state.PAGES:
        name = {"evaluate": "5 · Evaluate", "leaderboard": "6 · Leaderboard"}[tab]
        expect(page.get_by_role("tab", name=name)).to_have_attribute("aria-selected", "true")
        return
    expect(page.get_by_role("tab", name="4 · Why it works")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tab", name=analyses.get(tab).title)).to_have_attribute("aria-selected", "true")


def test_a_link_restores_the_state_and_the_url_follows_the_controls(open_page):
    from playwright.sync_api import expect

    page = open_page("method=ties&alpha=1.5&density=0.3&normalize=0&layers=1-2&tab=spectra")
    expect(page.locator("#merge-method input")).to_have_value("ties")
    expect(knob(page, 1)).to_have_value("1.5")  # alpha
    expect(knob(page, 3)).to_have_value("0.3")  # density
    assert choice(page, 1) == "0"  # normalize: off
    expect_tab(page, "spectra")
    page.get_by_text("Layer range and per-layer values").click()
    expect(page.locator("#layer-first input[type=number]")).to_have_value("1")
    expect(page.locator("#layer-last input[type=number]")).to_have_value("2")
    expect(page.locator("#state-message")).not_to_contain_text("could not be used")
    page.screenshot(path=str(OUT / "teaching_url_restore.png"), full_page=True)
    # the URL is rewritten to the whole state (every knob of ties), the link's values kept
    page.wait_for_function("() => location.search.includes('weight_vlm=')")
    q = url_query(page)
    assert (q["method"], q["alpha"], q["density"], q["normalize"], q["layers"], q["tab"]) == (
        "ties", "1.5", "0.3", "0", "1-2", "spectra")
    # ... and follows the controls: a knob, a choice, the method, the open tab
    knob(page, 3).fill("0.6")
    knob(page, 3).blur()
    page.wait_for_function("() => location.search.includes('density=0.6')")
    page.locator("#choice-2").get_by_text("1 · the BR2V").click()
    page.wait_for_function("() => location.search.includes('br2v=1')")
    page.get_by_role("tab", name="6 · Leaderboard").click()
    page.wait_for_function("() => location.search.includes('tab=leaderboard')")
    page.get_by_role("tab", name="4 · Why it works").click()
    page.get_by_role("tab", name="Layer knockout").click()
    page.wait_for_function("() => location.search.includes('tab=knockout')")
    pick_method(page, "linear")
    # the URL is rewritten whole once linear's knobs are in place; until then ties' may still be there
    wait_query(page, "q.get('method') === 'linear' && [...q.keys()].sort().join() === 'alpha,layers,method,tab'")
    state, notes = url_state.parse(url_query(page))
    assert notes == [] and state.method == "linear" and state.tab == "knockout" and state.layers == (1, 2)
    assert set(url_query(page)) == {"method", "alpha", "layers", "tab"}
    # the rewritten URL, opened in a new session, shows the same state
    again = open_page(urlsplit(page.url).query)
    expect(again.locator("#merge-method input")).to_have_value("linear")
    expect(again.locator("#knob-1 input[type=number]")).to_have_value(url_query(page)["alpha"])
    expect_tab(again, "knockout")


def test_a_link_opens_the_evaluate_and_leaderboard_tabs(open_page):
    from playwright.sync_api import expect

    for tab, button in (("evaluate", "#eval-btn"), ("leaderboard", "#lb-btn")):
        page = open_page(f"tab={tab}")
        expect_tab(page, tab)
        expect(page.locator(button)).to_be_visible()
        page.wait_for_function(f"() => location.search.includes('tab={tab}')")


def test_a_link_carries_the_per_layer_box(open_page):
    """A tuned schedule shared by link: the per-layer box opens with it, and the page's own URL keeps it."""
    from urllib.parse import quote

    from playwright.sync_api import expect

    page = open_page("method=task_arithmetic&per_layer=" + quote("alpha: [1.2, 0.3]"))
    page.get_by_text("Layer range and per-layer values").click()
    expect(page.get_by_label("Per-layer values (YAML, overrides the sliders)")).to_have_value("alpha: [1.2, 0.3]")
    wait_query(page, "q.get('per_layer') === 'alpha: [1.2, 0.3]' && q.has('alpha')")


def test_a_link_can_name_a_custom_triple_inside_the_models_root(open_page):
    from playwright.sync_api import expect

    page = open_page("vlm=vlm&reasoner=math&base=base&method=frank&use_prior=1&beta=0.2&tab=attention&__theme=dark")
    expect(page.locator("#merge-method input")).to_have_value("frank")
    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible()
    expect(page.get_by_label("Model triple")).to_have_value(presets.CUSTOM)
    expect(page.get_by_label("VLM", exact=True)).to_have_value("vlm")
    expect(page.locator("#frank-prior input")).to_be_checked()
    expect(knob(page, 2)).to_have_value("0.2")  # beta
    expect_tab(page, "attention")
    page.wait_for_function("() => location.search.includes('beta=0.2')")
    q = url_query(page)
    assert (q["vlm"], q["reasoner"], q["base"], q["use_prior"]) == ("vlm", "math", "base", "1") and "w_v" not in q
    assert q["__theme"] == "dark"  # Gradio's own parameter is kept
    expect(page.locator("#state-message")).not_to_contain_text("could not be used")


def test_bad_parameters_are_named_and_the_defaults_used(open_page):
    from playwright.sync_api import expect

    page = open_page("method=ties&alpha=9&density=lots&lam=1.5&normalize=3&foo=1&tab=nowhere&layers=2-9")
    msg = page.locator("#state-message")
    for name in ("alpha", "density", "normalize", "foo", "tab", "layers"):
        expect(msg).to_contain_text(name)
    expect(msg).to_contain_text("outside 0..2")
    expect(msg).to_contain_text("not a number")
    expect(page.locator("#merge-method input")).to_have_value("ties")
    expect(knob(page, 1)).to_have_value("1")  # alpha: ties' default
    expect(knob(page, 4)).to_have_value("1.5")  # lam, which was fine
    expect_tab(page, "chat")
    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible()
    page.locator("#state-message").screenshot(path=str(OUT / "teaching_url_bad_params.png"))
    page.wait_for_function("() => !location.search.includes('foo=')")  # the URL says what is shown
    assert url_query(page)["alpha"] == "1"

    for query, name, default in [("method=nonsense&alpha=0.3", "method", "task_arithmetic"),
                                 ("preset=nope", "preset", "task_arithmetic"),
                                 ("vlm=../../etc&reasoner=math&base=base", "vlm", "task_arithmetic"),
                                 ("method=ip_merging&rank=5000", "rank", "ip_merging")]:
        page = open_page(query)
        expect(page.locator("#state-message")).to_contain_text(name)
        expect(page.locator("#merge-method input")).to_have_value(default)
        expect(page.get_by_text("Compatible: ready to merge")).to_be_visible()
    expect(page.locator("#state-message")).to_contain_text("hidden size")
    expect(knob(page, 3)).to_have_value("128")  # rank, at the toy's hidden size
    page.screenshot(path=str(OUT / "teaching_url_rank_clamped.png"))


def test_every_walkthrough_step_sets_the_state_it_describes(open_page):
    from playwright.sync_api import expect

    page = open_page()
    page.get_by_text("Walkthrough: the papers' findings").click()
    expect(page.locator("#walk-1")).to_be_visible()
    page.screenshot(path=str(OUT / "teaching_walkthrough.png"), full_page=True)
    for i, step in enumerate(STEPS, 1):
        page.locator(f"#walk-{i}").click()
        method = step.query["method"]
        expect(page.locator("#merge-method input")).to_have_value(method)
        name, value = next((k, v) for k, v in step.query.items() if k not in url_state.RESERVED)
        if name == "use_prior":
            expect(page.locator("#frank-prior input")).to_be_checked()
            name, value = "beta", step.query["beta"]
        slot = [p.name for p in recipes.numeric_params(method)].index(name) + 1
        expect(knob(page, slot)).to_have_value(value)
        expect_tab(page, step.query["tab"])
        wait_query(page, f"q.get('method') === '{method}' && (q.get('tab') || 'chat') === '{step.query['tab']}'")
        assert url_state.parse(url_query(page))[0].method == method and url_query(page).get("tab", "chat") == step.query["tab"]
        page.screenshot(path=str(OUT / f"teaching_walkthrough_step{i}.png"), full_page=True)


def test_knobs_choices_prior_caps_clamping_and_export_line(open_page):
    from playwright.sync_api import expect

    page = open_page()
    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible()
    page.get_by_text("Recipe (YAML) and export").click()
    page.get_by_role("button", name="Export merged model to a folder").click()
    expect(page.locator("#export-status")).to_contain_text("Merge first")

    pick_method(page, "ties")  # choices as radios with labelled options, not sliders
    expect(page.locator("#choice-1")).to_contain_text("normalize")
    expect(page.locator("#choice-1")).to_contain_text("1 · divide by the summed weights")
    expect(page.locator("#choice-2")).to_contain_text("br2v")
    assert choice(page, 1) == "1"
    for i in (1, 2, 3, 4):
        expect(page.locator(f"#knob-{i}")).to_be_visible()
    expect(page.locator("#knob-5")).to_be_hidden()
    page.locator("#choice-1").screenshot(path=str(OUT / "teaching_knobs_ties_choices.png"))

    pick_method(page, "frank")  # beta only with the prior, w_v only without
    expect(page.locator("#knob-1")).to_be_visible()
    expect(page.locator("#knob-2")).to_be_hidden()
    page.locator("#frank-prior input").check()
    expect(page.locator("#knob-2")).to_be_visible()
    expect(page.locator("#knob-1")).to_be_hidden()
    page.screenshot(path=str(OUT / "teaching_knobs_frank_prior.png"))

    pick_method(page, "ip_merging")  # rank capped at the hidden size; svd a three-way choice
    expect(page.locator("#choice-1")).to_contain_text("2 · randomized")
    assert knob(page, 3).get_attribute("max") == "128"
    knob(page, 3).fill("500")  # typed past the cap: the browser clamps it, the status says so
    knob(page, 3).blur()
    expect(knob(page, 3)).to_have_value("128")
    knob(page, 2).fill("0.5")  # top_fraction: something to merge
    knob(page, 2).blur()
    page.locator("#merge-btn").click()
    status = page.locator("#merge-status")
    expect(status).to_contain_text("Merged with ip_merging", timeout=180_000)
    expect(status).to_contain_text("rank")
    expect(status).to_contain_text("500 is above this model's hidden size (128); clamped to 128")
    expect(page.locator("#export-status")).not_to_contain_text("Merge first")
    page.locator("#merge-status").screenshot(path=str(OUT / "teaching_merge_clamped.png"))


def test_a_hostile_link_runs_no_script_and_is_named(open_page):
    """Script in a knob, a method, a tab and a key; a 10 000-character value and 300 keys: no script runs,
    no element is injected, each bad parameter is named as inert text, the page stays usable. A link past
    16 K characters gets 414 and one line (Gradio's page route failed with a 500 past 64 K)."""
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    from playwright.sync_api import expect

    img = "<img src=x id=pwned onerror=window.__pwned=1>"
    script = "<script>window.__pwned=1</script>"
    query = "&".join([f"method={quote(img)}", f"tab={quote(script)}", f"alpha={quote('`' + img + '`')}",
                      f"{quote(img)}=1", "layers=" + "9" * 10_000]
                     + [f"k{i}=1" for i in range(300)])
    page = open_page(query)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    msg = page.locator("#state-message")
    expect(msg).to_contain_text("method")
    expect(msg).to_contain_text("tab")
    assert page.evaluate("() => window.__pwned === undefined"), "an injected handler ran"
    assert page.locator("#pwned").count() == 0 and not dialogs
    expect(page.locator("#merge-method input")).to_have_value("task_arithmetic")
    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible()
    page.wait_for_function("() => location.search.length < 2000")  # the URL is rewritten to the state shown
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(page.url.split("?")[0] + "?layers=" + "9" * 100_000, timeout=30)
    assert e.value.code == 414
    assert e.value.read().decode() == "the link is 100,008 characters; the lab reads links of at most 16,384\n"


def test_a_step_shows_its_measured_outcome_and_the_panel_says_what_is_live(open_page):
    """Step 4 merged: its measured outcome (both models, 95% intervals) under the status; a later step
    changes the panel, and the page says the chat still answers with the step-4 merge. Picking the same
    triple again keeps the merge; an empty question and a typed value the browser clamped are said at once;
    the compatibility line's tensor count is the merge's."""
    import re

    from playwright.sync_api import expect

    page = open_page()
    compat = page.get_by_text("language-model tensors merged")
    expect(compat).to_be_visible()
    page.get_by_text("Walkthrough: the papers' findings").click()
    page.locator("#walk-4").click()
    expect(page.locator("#merge-method input")).to_have_value("ip_merging")
    page.locator("#merge-btn").click()
    status = page.locator("#merge-status")
    expect(status).to_contain_text("Merged with ip_merging", timeout=180_000)
    outcome = page.locator("#merge-outcome")
    expect(outcome).to_contain_text("Measured outcome of ip_merging", timeout=300_000)
    for words in ("perception", "visual math", "95% interval", "points"):
        expect(outcome).to_contain_text(words)
    assert re.search(r"the VLM \d+\.\d% \[\d+\.\d, \d+\.\d\] → \d+\.\d% \[", outcome.inner_text())
    for suite in ("visual math", "perception"):  # the step's text quotes what its outcome shows
        a, b = re.search(suite + r"[^:]*: the VLM (\d+\.\d)% \[[^]]*\] → (\d+\.\d)%", outcome.inner_text()).groups()
        assert f"{suite} {round(float(a))}% -> {round(float(b))}%" in STEPS[3].text, (suite, a, b)
    merged = re.search(r"changed \d+ of (\d+) tensors in scope", status.inner_text()).group(1)
    assert f"{merged} of its" in compat.inner_text()  # one count in both places
    outcome.screenshot(path=str(OUT / "teaching_step4_outcome.png"))
    expect(page.locator("#merge-live")).to_have_text("")  # the panel is what answers

    page.locator("#walk-3").click()  # another method in the panel; the merge stays live
    expect(page.locator("#merge-method input")).to_have_value("task_arithmetic")
    live = page.locator("#merge-live")
    expect(live).to_contain_text("Live in the chat: ip_merging")
    expect(live).to_contain_text("task_arithmetic")
    expect(page.locator("#chat-merged")).to_contain_text("Merged model: ip_merging")

    page.get_by_label("Model triple").click()  # the same triple again: nothing is dropped
    page.get_by_role("option", name=presets.DEFAULT, exact=True).click()
    expect(status).to_contain_text("Merged with ip_merging")
    expect(page.locator("#chat-merged")).to_contain_text("Merged model: ip_merging")

    page.locator("#chat-box textarea").press("Enter")
    expect(page.get_by_text("Type a question first")).to_be_visible()

    knob(page, 1).fill("99")  # task_arithmetic's alpha: above its maximum, said before any Merge
    knob(page, 1).blur()
    expect(page.locator("#clamp-note")).to_contain_text("alpha")
    expect(page.locator("#clamp-note")).to_contain_text("99 is above its maximum")
    page.screenshot(path=str(OUT / "teaching_live_line.png"), full_page=True)

    page.get_by_label("Model triple").click()  # another triple: the outcome of the merge dropped goes too
    page.get_by_role("option", name=presets.CUSTOM, exact=True).click()
    expect(status).to_contain_text("Another triple")
    expect(outcome).to_have_text("")
    page.get_by_role("tab", name="7 · Sweep & tune").click()
    expect(page.locator("#sweep-of")).to_contain_text("Nothing merged yet")
