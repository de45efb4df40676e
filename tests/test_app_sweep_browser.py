"""The Sweep & tune tab in a real headless Chromium: merge, sweep alpha (curves with interval bands drawn
as the points arrive), run the tuner for two trials and load a front point into the merge panel.

Screenshots go to tests/_output/ (app_sweep.png, app_tune.png)."""

from __future__ import annotations

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

    page.locator("#tune-trials input").fill("2")
    page.locator("#tune-limit input").fill("4")
    page.locator("#tune-btn").click()
    tune = page.locator("#status-tune")
    expect(tune).to_contain_text("trials in the study", timeout=300_000)
    expect(tune).to_contain_text("held-out")
    expect(page.locator("#tune-plot .js-plotly-plot")).to_be_visible()
    page.locator("#tune-point input").click()
    page.get_by_role("option").filter(has_text="chosen").first.click()
    page.locator("#tune-load").click()
    expect(page.locator("#status-tune-load")).to_contain_text("is set in", timeout=30_000)
    expect(page.locator("#status-tune-load")).to_contain_text("->")  # a start -> end schedule
    page.screenshot(path=str(SHOTS / "app_tune.png"), full_page=True)
