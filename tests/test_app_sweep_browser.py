"""The Sweep & tune tab in a real headless Chromium: merge, sweep alpha (curves with interval bands drawn
as the points arrive), run the tuner for two trials and load a front point into the merge panel (the one its hover names);
a plot's toolbar downloads it as SVG and PNG.

Screenshots go to tests/_output/ (app_sweep.png, app_tune_hover.png, app_tune.png)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    page.locator("#sweep-values textarea, #sweep-values input").first.fill("0, 0.5, 1")
    page.locator("#sweep-limit input").fill("4")
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
    # gr.Plot sends no click on a point: a front point's hover names its entry in the list below
    box = page.locator("#tune-plot .scatterlayer .trace").nth(1).locator("path.point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    hover = page.locator("#tune-plot .hoverlayer")
    expect(hover).to_contain_text("pick this entry in", timeout=10_000)
    said = hover.text_content().split("(dev")[0].strip()  # "trial N: knobs"
    page.locator("#tune-plot").screenshot(path=str(SHOTS / "app_tune_hover.png"))
    page.locator("#tune-point input").click()
    assert page.get_by_role("option").filter(has_text=said).count() == 1, said
    page.get_by_role("option").filter(has_text="chosen").first.click()
    page.locator("#tune-load").click()
    expect(page.locator("#status-tune-load")).to_contain_text("is set in", timeout=30_000)
    expect(page.locator("#status-tune-load")).to_contain_text("->")  # a start -> end schedule
    page.screenshot(path=str(SHOTS / "app_tune.png"), full_page=True)
