"""The Evaluate and Leaderboard tabs in the real app and a real headless Chromium, on the bundled family
with tiny numbers: the VLM and the merge side by side (with progress and Cancel), an uploaded eval set
(a bad line named, the disagreements listed with their images), the leaderboard's scatter and table
(cancel, the cache) and a row's recipe loaded into the merge panel.

Screenshots go to tests/_output/scoring_*.png; the panels' times are printed (pytest -s shows them).
Needs /usr/bin/chromium (see test_app_browser).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.app_fixtures import SHOTS, chromium

pytestmark = [pytest.mark.slow, pytest.mark.browser]

OUT = SHOTS
WAIT = 60_000
LONG = 300_000


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import expect

    with chromium() as browser:
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(WAIT)
        pg.goto(app_url)
        expect(pg.get_by_text("Compatible: ready to merge")).to_be_visible(timeout=90_000)
        yield pg


def timed(what: str, t0: float) -> float:
    el = time.monotonic() - t0
    print(f"\n[timing] {what}: {el:.1f} s")
    return el


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()


def eval_set(folder: Path, toy: Path, bad_line: int | None = None) -> list[str]:
    """A JSONL of bundled visual_math and text_math items and the images it names (flat, as uploaded one by one)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for suite, n in (("visual_math", 16), ("text_math", 6)):
        rows += [json.loads(x) for x in (toy / "eval" / f"{suite}.jsonl").read_text().splitlines()[:n]]
    lines = [json.dumps(r) for r in rows]
    if bad_line:
        lines[bad_line - 1] = '{"question": "how many ?", "answer": 3}'
    (folder / "my_set.jsonl").write_text("\n".join(lines) + "\n")
    files = [str(folder / "my_set.jsonl")]
    for r in rows:
        if r["image"]:
            shutil.copy(toy / "eval" / r["image"], folder / Path(r["image"]).name)
            files.append(str(folder / Path(r["image"]).name))
    return files


def test_evaluate_panel_in_browser(page, toy_dir, tmp_path, app_handle):
    from playwright.sync_api import expect

    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged with task_arithmetic", timeout=90_000)
    page.get_by_role("tab", name="5 · Evaluate").click()
    set_number(page, "eval-limit", 6)
    t0 = time.monotonic()
    page.locator("#eval-btn").click()
    status = page.locator("#status-evaluate")
    expect(status).to_contain_text("Done in", timeout=LONG)
    timed("Evaluate, 6 items x 3 suites, VLM + merge", t0)
    table = page.locator("#eval-table")
    for text in ("perception", "visual_math", "text_math", "original VLM", "merged: task_arithmetic alpha",
                 "difference (points)"):
        expect(table).to_contain_text(text)
    page.screenshot(path=str(OUT / "scoring_evaluate.png"), full_page=True)
    # progress, then Cancel: the worker confirms
    set_number(page, "eval-limit", 250)
    page.locator("#eval-btn").click()
    expect(status).to_contain_text("Evaluating", timeout=WAIT)
    expect(status).to_contain_text("%", timeout=LONG)  # the progress bar
    page.locator("#status-evaluate").screenshot(path=str(OUT / "scoring_evaluate_progress.png"))
    page.locator("#eval-cancel").click()
    expect(status).to_contain_text("cancelled after", timeout=LONG)

    # your own set: a bad line is named with its number, before the worker is asked
    page.locator("#eval-files input[type=file]").set_input_files(eval_set(tmp_path / "bad", toy_dir, bad_line=3))
    # the file list may render the name and its extension in two cells ("my_set .jsonl")
    expect(page.locator("#eval-files")).to_contain_text(re.compile(r"my_set\s*\.jsonl"), timeout=WAIT)
    page.locator("#eval-own-btn").click()
    own = page.locator("#status-eval-own")
    expect(own).to_contain_text('my_set.jsonl line 3: "answer" must be a string, not int', timeout=WAIT)
    page.locator("#eval-own").screenshot(path=str(OUT / "scoring_own_bad_line.png"))
    page.locator("#eval-files button[aria-label='Clear']").first.click()
    page.locator("#eval-files input[type=file]").set_input_files(eval_set(tmp_path / "good", toy_dir))
    # the file list may render the name and its extension in two cells ("my_set .jsonl")
    expect(page.locator("#eval-files")).to_contain_text(re.compile(r"my_set\s*\.jsonl"), timeout=WAIT)
    t0 = time.monotonic()
    page.locator("#eval-own-btn").click()
    expect(own).to_contain_text("items; the two models' final answers differ on", timeout=LONG)
    timed("Evaluate my set, 22 items, VLM + merge", t0)
    expect(page.locator("#eval-own-table")).to_contain_text("custom")
    differ = int(own.inner_text().split("differ on")[1].split()[0].strip("*."))
    if differ:
        expect(page.locator("#eval-disagree")).to_contain_text("line")
    pictured = page.locator("#eval-gallery img")
    assert pictured.count() <= differ
    if pictured.count():  # the caption key names what the merge is compared with (here the VLM)
        expect(page.locator("#eval-gallery")).to_contain_text("(line: the VLM's answer → this merge's)")
    if pictured.count():  # each picture loads (the staged upload they came from is gone by now)
        page.wait_for_function("() => [...document.querySelectorAll('#eval-gallery img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
    # the two unpacked sets (the refused one and the scored one) are gone from the server's upload folder
    assert list((app_handle.cache.parent / "gradio-tmp").glob("merge-lab-uploads-*/eval-set-*")) == []
    page.locator("#eval-own").screenshot(path=str(OUT / "scoring_own_set.png"))


def pick_row(page) -> str:
    """Pick a tuned row, one with knobs when there is one; its shown text."""
    page.locator("#lb-row input").click()
    options = page.get_by_role("option")
    with_knobs = options.filter(has_text="best on dev (")
    option = with_knobs.first if with_knobs.count() else options.filter(has_text="best on dev").first
    text = option.inner_text().strip()
    option.click()
    return text


def test_the_shipped_results_show_at_once(page):
    """The leaderboard and the knockout open with the bundled family's shipped results, marked; Run at
    those settings shows them again without the worker (a class does not queue for them)."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="4 · Why it works").click()
    page.get_by_role("tab", name="Layer knockout").click()
    expect(page.locator("#status-knockout")).to_contain_text("Precomputed for the bundled family (40 items")
    expect(page.locator("#plot-knockout .js-plotly-plot")).to_be_visible()
    page.get_by_role("tab", name="6 · Leaderboard").click()
    status = page.locator("#status-leaderboard")
    expect(status).to_contain_text("Precomputed for the bundled family (30 held-out")
    expect(status).to_contain_text("python -m tools.precompute")
    expect(page.locator("#lb-table")).to_contain_text("the math LLM")
    t0 = time.monotonic()
    page.locator("#lb-btn").click()
    expect(status).to_contain_text(re.compile(r"✓\s*Precomputed"))
    assert timed("Leaderboard at the defaults (shipped)", t0) < 10


def test_leaderboard_panel_in_browser(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="6 · Leaderboard").click()
    for k, v in (("lb-limit", 2), ("lb-dev-items", 2), ("lb-grid-size", 1)):
        set_number(page, k, v)
    status = page.locator("#status-leaderboard")
    t0 = time.monotonic()
    page.locator("#lb-btn").click()
    expect(status).to_contain_text("Ranking the methods", timeout=WAIT)
    expect(status).to_contain_text("method(s) ranked", timeout=LONG)
    timed("Leaderboard, 8 methods, limit 2, dev 2, grid 1 (computed)", t0)
    expect(status).to_contain_text("computed")
    expect(page.locator("#lb-plot .js-plotly-plot")).to_be_visible(timeout=WAIT)
    table = page.locator("#lb-table")
    for text in ("the VLM", "the math LLM", "ties", "best on dev", "Δ visual math"):
        expect(table).to_contain_text(text)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(OUT / "scoring_leaderboard.png"), full_page=True)
    page.locator("#lb-plot").screenshot(path=str(OUT / "scoring_leaderboard_plot.png"))
    # the same numbers again: from the cache, at once
    t0 = time.monotonic()
    page.locator("#lb-btn").click()
    expect(status).to_contain_text("from the cache", timeout=WAIT)
    assert timed("Leaderboard again (cached)", t0) < 30
    # other numbers (minutes of work): progress, then Cancel; the worker confirms
    for k, v in (("lb-limit", 100), ("lb-dev-items", 50), ("lb-grid-size", 3)):
        set_number(page, k, v)
    page.locator("#lb-btn").click()
    expect(status).to_contain_text("%", timeout=LONG)
    page.locator("#lb-cancel").click()
    expect(status).to_contain_text("cancelled after", timeout=LONG)

    # a row's recipe into the merge panel, then merged with it
    row = pick_row(page)
    method = row.split(" · ")[0]
    page.locator("#lb-load").click()
    expect(page.locator("#status-lb-load")).to_contain_text("is set in", timeout=WAIT)
    expect(page.locator("#merge-method input")).to_have_value(method)
    expect(page.locator("#merge-status")).to_contain_text("from the leaderboard")
    knobs = row.split("(", 1)[1].rstrip(")") if "(" in row else ""
    for part in filter(None, knobs.split(", ")):
        name, value = part.split(" ")
        expect(page).to_have_url(re.compile(rf"[?&]{name}={re.escape(value)}(&|$)"))  # the link follows, too
    page.wait_for_timeout(1500)  # a full-page shot resizes the page: let plotly redraw its plots first
    page.screenshot(path=str(OUT / "scoring_leaderboard_loaded.png"), full_page=True)
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text(f"Merged with {method}", timeout=90_000)

    # another triple: the leaderboard says it runs on the toy family only
    page.locator("#lab-title").scroll_into_view_if_needed()
    page.get_by_label("Model triple").click()
    page.get_by_role("option").filter(has_text="Qwen2-VL-7B").first.click()
    expect(page.locator("#lb-toy-note")).to_contain_text("bundled toy family only", timeout=WAIT)
    expect(page.locator("#lb-btn")).to_be_disabled()
    page.locator("#lb-toy-note").screenshot(path=str(OUT / "scoring_leaderboard_other_triple.png"))
