"""The Sweep & tune tab in a real headless Chromium: merge, sweep alpha (curves with interval bands drawn
as the points arrive), run the tuner for two trials, load a front point into the merge panel by a click on it
(not the list), then another from the list (the one its hover names); a plot's toolbar downloads it as SVG and PNG.

Screenshots go to tests/_output/ (app_sweep.png, app_tune_hover.png, app_tune_click.png, app_tune.png)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.app_fixtures import SHOTS, chromium

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def page(app_url):
    with chromium() as browser:
        pg = browser.new_page(viewport={"width": 1440, "height": 1100})
        pg.set_default_timeout(60_000)
        pg.goto(app_url)
        yield pg


def test_sweep_and_tune_tab(page):
    from playwright.sync_api import expect

    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible(timeout=60_000)
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged with", timeout=90_000)
    page.get_by_role("tab", name="7 · Sweep & tune").click()
    expect(page.locator("#sweep-btn")).to_be_visible()
    expect(page.locator("#sweep-of")).to_contain_text("task_arithmetic alpha")  # the merge it varies, named
    values = page.locator("#sweep-values textarea, #sweep-values input").first
    for _ in range(5):  # a tab opened for the first time may still mount and put its initial value back
        values.fill("0, 0.5, 1")
        page.wait_for_timeout(400)
        if values.input_value() == "0, 0.5, 1":
            break
    expect(values).to_have_value("0, 0.5, 1")
    page.locator("#sweep-limit input").fill("4")
    expect(page.locator("#sweep-limit input")).to_have_value("4")
    page.locator("#sweep-btn").click()
    status = page.locator("#status-sweep")
    expect(status).to_contain_text("3 values of alpha scored", timeout=180_000)
    expect(status).to_contain_text("checkpoint's weights")
    plot = page.locator("#sweep-plot")
    expect(plot.locator(".js-plotly-plot")).to_be_visible()
    expect(plot).to_contain_text("visual_math")
    plot.screenshot(path=str(SHOTS / "app_sweep.png"))
    # the plot's toolbar downloads it, drawn by plotly.js in this browser: an SVG document, a PNG image
    for fmt, head in (("SVG", b"<svg"), ("PNG", b"\x89PNG")):
        with page.expect_download(timeout=30_000) as got:
            plot.locator(f"button[aria-label={fmt}]").click()
        data = Path(got.value.path()).read_bytes()
        assert got.value.suggested_filename == f"sweep-plot.{fmt.lower()}" and data.startswith(head), fmt
        assert fmt == "PNG" or b"visual_math" in data

    page.locator("#tune-trials input").fill("2")
    page.locator("#tune-limit input").fill("4")
    page.locator("#tune-btn").click()
    tune = page.locator("#status-tune")
    expect(tune).to_contain_text("trials in the study", timeout=300_000)
    expect(tune).to_contain_text("held-out")
    expect(page.locator("#tune-plot .js-plotly-plot")).to_be_visible()
    page.get_by_text("Layer range and per-layer values").click()  # the accordion with the per-layer box
    per_layer = page.get_by_label("Per-layer values (YAML, overrides the sliders)")
    expect(per_layer).to_have_value("")
    # a front point's hover names its entry in the list below; a click on it loads it (front_click's hook)
    page.locator("#tune-plot").scroll_into_view_if_needed()  # the mouse reaches only what is in the viewport
    point = page.locator("#tune-plot .scatterlayer .trace").nth(1).locator("path.point").first
    box = point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    hover = page.locator("#tune-plot .hoverlayer")
    expect(hover).to_contain_text("click to load it", timeout=10_000)
    said = hover.text_content().split("(dev")[0].strip()  # "trial N: knobs"
    # the hovered point as plotly holds it (the figure Python sent): its knobs and its label
    knobs_json, label = page.evaluate("() => document.querySelector('#tune-plot .js-plotly-plot')"
                                      "._hoverdata[0].customdata")
    assert label.startswith(said), (label, said)
    page.locator("#tune-plot").screenshot(path=str(SHOTS / "app_tune_hover.png"))
    box = point.bounding_box()  # where it is now (a screenshot may scroll)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # the point, not the list
    loaded = page.locator("#status-tune-load")
    expect(loaded).to_contain_text("is set in", timeout=30_000)
    knobs = json.loads(knobs_json)
    expect(loaded).to_contain_text(f"({said.split(': ', 1)[1]})")  # the clicked point's knobs, as its label says
    expect(page.locator("#merge-method input")).to_have_value(page.locator("#tune-method input").input_value())
    schedules = {k: pytest.approx(v) for k, v in knobs.items() if isinstance(v, list)}
    assert schedules and yaml.safe_load(per_layer.input_value()) == schedules, per_layer.input_value()
    # the link carries the schedule too, so a shared link opens this very merge
    page.wait_for_function("() => new URLSearchParams(location.search).has('per_layer')", timeout=10_000)
    linked = page.evaluate("() => new URLSearchParams(location.search).get('per_layer')")
    assert yaml.safe_load(linked) == schedules, linked
    expect(page.locator("#tune-point input")).to_have_value(label)  # the list names the point clicked
    page.screenshot(path=str(SHOTS / "app_tune_click.png"), full_page=True)
    page.locator("#tune-point input").click()
    assert page.get_by_role("option").filter(has_text=said).count() == 1, said
    chosen = page.get_by_role("option").filter(has_text="chosen").first
    chosen_knobs = chosen.inner_text().split(": ", 1)[1].split(" (dev")[0]  # "trial N: knobs (dev ...)"
    chosen.click()
    page.locator("#tune-load").click()
    expect(page.locator("#status-tune-load")).to_contain_text(f"({chosen_knobs})", timeout=30_000)
    expect(page.locator("#status-tune-load")).to_contain_text("->")  # a start -> end schedule
    page.screenshot(path=str(SHOTS / "app_tune.png"), full_page=True)
