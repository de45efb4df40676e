"""The real app in a real headless Chromium: merge through the UI, see a plot, ask the example question.

Screenshots go to tests/_output/. Needs Debian's chromium at /usr/bin/chromium (apt-get install -y
chromium); without it the test is skipped, unless LAB_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import pytest

from tests.app_fixtures import SHOTS, chromium

pytestmark = [pytest.mark.slow, pytest.mark.browser]

OUT = SHOTS


@pytest.fixture(scope="module")
def page(app_url):
    with chromium() as browser:
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(app_url)
        yield pg


def test_merge_plot_and_chat_in_browser(page):
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name="Merge lab")).to_be_visible()
    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible()
    page.screenshot(path=str(OUT / "app_start.png"), full_page=True)

    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged with task_arithmetic", timeout=90_000)
    # the merge explains itself: what changed, by how much
    expect(page.locator("#merge-status")).to_contain_text("tensors in scope")
    expect(page.locator("#merge-status")).to_contain_text("relative norm change")
    page.locator("#merge-status").screenshot(path=str(OUT / "app_merge_summary.png"))
    # ... and per layer, as a bar chart under the status
    expect(page.locator("#merge-change-plot .js-plotly-plot")).to_be_visible(timeout=30_000)
    expect(page.locator("#merge-change-plot")).to_contain_text("layer 3")
    page.locator("#merge-change-plot").screenshot(path=str(OUT / "app_merge_layers.png"))

    page.get_by_role("tab", name="4 · Why it works").click()
    page.locator("#compute-similarity").click()
    expect(page.locator("#plot-similarity .js-plotly-plot")).to_be_visible(timeout=90_000)
    page.screenshot(path=str(OUT / "app_analysis.png"), full_page=True)

    page.get_by_role("tab", name="3 · Chat").click()
    example = page.locator(".gallery-item, [data-testid='examples'] button, .examples button, table.examples td")
    question = example.first.inner_text().strip()
    example.first.click()  # one click loads and asks the example question
    merged = page.locator("#chat-merged")
    expect(merged).to_contain_text(question.split(" ?")[0], timeout=30_000)
    bot = merged.locator(".message.bot, [data-testid='bot']").last
    expect(bot).not_to_have_text("…", timeout=90_000)
    expect(page.locator("#chat-original [data-testid='bot'], #chat-original .message.bot").last).not_to_have_text(
        "…", timeout=90_000)
    assert bot.inner_text().strip()
    page.screenshot(path=str(OUT / "app_chat.png"), full_page=True)
    # every answer says what produced it, and the pane's title names the merge
    expect(bot).to_contain_text("answered by: task_arithmetic alpha", timeout=30_000)
    expect(merged).to_contain_text("Merged model: task_arithmetic alpha")
    # each pane's title sits above its conversation, so scrolled text never runs under it
    for pane in ("#chat-merged", "#chat-original"):
        title = page.locator(f"{pane} > .wrapper > label[data-testid=block-label]").bounding_box()
        log = page.locator(f"{pane} > .wrapper > .bubble-wrap").bounding_box()
        assert title["y"] + title["height"] <= log["y"] + 1, (pane, title, log)


def test_chat_labels_limits_and_reset(page):
    """(runs after the merge test, same page) max new tokens stops at half the toy's context;
    'Back to the original VLM' drops the tab's merge; a pane's trash icon clears both panes."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="3 · Chat").click()
    slider = page.locator("input[type=range][aria-label='max new tokens'], "
                          ":text('max new tokens') >> xpath=ancestor::*[.//input[@type='range']][1]//input[@type='range']").first
    assert slider.get_attribute("max") == "64"  # the toy LM's context is 128 tokens
    merged = page.locator("#chat-merged")
    merged.hover()
    page.locator("#chat-merged button[aria-label='Clear'], #chat-merged button[title='Clear']").first.click()
    expect(page.locator("#chat-original .message, #chat-original [data-testid='bot']")).to_have_count(0)
    page.locator("#chat-reset").click()
    expect(merged).to_contain_text("none yet")
    expect(merged).to_contain_text("No merge yet in this tab")
    page.screenshot(path=str(OUT / "app_chat_reset.png"), full_page=True)


def test_missing_presets_are_marked_and_picking_one_is_calm(page):
    """A hub triple not in the local cache says so in the dropdown; picking it lists what is missing
    (not a big error), disables Merge and drops the tab's merge from the chat; custom fields list
    every problem at once."""
    from playwright.sync_api import expect

    dropdown = page.get_by_label("Model triple")
    dropdown.click()
    option = page.get_by_role("option", name="Qwen2-VL-7B + Qwen2-Math-7B (not downloaded)")
    expect(option).to_be_visible()
    option.click()
    expect(page.get_by_text("Not usable here")).to_be_visible(timeout=30_000)
    expect(page.locator("h3", has_text="Not usable here")).to_have_count(0)
    expect(page.get_by_text("not in the local Hugging Face cache").first).to_be_visible()
    expect(page.locator("#merge-btn")).to_be_disabled()
    expect(page.locator("#chat-merged")).to_contain_text("none yet")
    expect(page.locator("#merge-status")).to_contain_text("Another triple")  # the toy merge is not shown as current
    expect(page.locator("#merge-change-plot")).to_be_hidden()
    page.screenshot(path=str(OUT / "app_preset_missing.png"), full_page=True)

    dropdown.click()
    page.get_by_role("option", name="Custom triple (folders or hub ids)").click()
    page.get_by_label("VLM", exact=True).fill("no/such-vlm")
    page.get_by_label("Reasoner (math LLM)").fill("no/such-reasoner")
    page.get_by_label("Shared base LLM").fill("no/such-base")
    page.get_by_role("button", name="Check compatibility").click()
    for role in ("vlm", "reasoner", "base"):
        expect(page.locator("li", has_text=f"{role}: no/such-{role}")).to_be_visible(timeout=30_000)
    expect(page.locator("#merge-btn")).to_be_disabled()
    page.screenshot(path=str(OUT / "app_custom_problems.png"), full_page=True)

    dropdown.click()
    page.get_by_role("option", name="Toy family (bundled, CPU, seconds)").click()
    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible(timeout=30_000)
    expect(page.locator("#merge-btn")).to_be_enabled()


def test_attention_fit_sets_franks_prior_in_one_click(page):
    from playwright.sync_api import expect

    expect(page.get_by_text("Compatible: ready to merge")).to_be_visible(timeout=60_000)  # the page's load is done
    page.get_by_role("tab", name="4 · Why it works").click()
    page.get_by_role("tab", name="Attention decay").click()
    page.locator("#compute-attention").click()
    button = page.locator("#use-beta")
    expect(button).to_be_visible(timeout=90_000)
    beta = button.inner_text().split("β = ")[1].split(" ")[0]
    expect(page.locator("#plot-attention .js-plotly-plot .scatterlayer .trace")).to_have_count(2)
    page.locator("#plot-attention").screenshot(path=str(OUT / "app_attention.png"))
    button.click()
    expect(page.locator("#merge-method input")).to_have_value("frank", timeout=30_000)
    expect(page.locator("#frank-prior input[type=checkbox]")).to_be_checked()
    slider = page.locator("[id^=knob-]:visible", has_text="beta").locator("input[type=number]")
    assert abs(float(slider.input_value()) - float(beta)) < 1e-3, (slider.input_value(), beta)
    expect(page.locator("#plot-attention .js-plotly-plot .scatterlayer .trace")).to_have_count(2)  # fit still drawn
    page.wait_for_timeout(500)
    page.screenshot(path=str(OUT / "app_attention_beta_to_frank.png"))


def test_the_drift_mode_is_not_cut_by_its_arrow(page):
    """(same page) the longest DRIFT mode fits its dropdown."""
    from playwright.sync_api import expect

    if not page.locator("#drift-mode input").is_visible():
        page.get_by_text("2b · DRIFT fine-tune").click()
    box = page.locator("#drift-mode input")
    expect(box).to_be_visible()
    box.click()
    page.get_by_role("option", name="adaptive_cosine").click()
    expect(box).to_have_value("adaptive_cosine")
    scroll, client = box.evaluate("e => [e.scrollWidth, e.clientWidth]")
    assert scroll <= client, (scroll, client)
    page.locator("#drift-panel").screenshot(path=str(OUT / "app_drift_panel.png"))


def test_two_merges_side_by_side_in_chat_and_evaluate(page):
    """(same page) merge A, then B; pick A for the chat's right pane: both panes answer, each signed by its
    merge; Evaluate's picker follows and scores B against A."""
    import re

    from playwright.sync_api import expect

    page.locator("#merge-method input").click()  # an earlier test left FRANK picked
    page.get_by_role("option", name="task_arithmetic", exact=True).click()
    for alpha in ("0.5", "0.9"):
        box = page.locator("#knob-1 input[type=number]")
        box.fill(alpha)
        box.press("Enter")
        page.locator("#merge-btn").click()
        expect(page.locator("#chat-merged")).to_contain_text(f"Merged model: task_arithmetic alpha {alpha}",
                                                             timeout=90_000)
    page.get_by_role("tab", name="3 · Chat").click()
    page.locator("#chat-compare input").click()
    page.get_by_role("option", name=re.compile("merge: task_arithmetic alpha 0.5")).click()
    expect(page.locator("#chat-original")).to_contain_text("Compared with (merge: task_arithmetic alpha 0.5")
    ask = page.locator("#chat-box textarea")
    ask.fill("6 more triangles are added . how many triangles now ?")
    ask.press("Enter")
    right = page.locator("#chat-original [data-testid='bot'], #chat-original .message.bot").last
    left = page.locator("#chat-merged [data-testid='bot'], #chat-merged .message.bot").last
    expect(right).to_contain_text("answered by: task_arithmetic alpha 0.5", timeout=90_000)
    expect(left).to_contain_text("answered by: task_arithmetic alpha 0.9", timeout=90_000)
    page.screenshot(path=str(OUT / "app_chat_two_merges.png"), full_page=True)
    page.get_by_role("tab", name="5 · Evaluate").click()
    expect(page.locator("#eval-compare input")).to_have_value(re.compile("merge: task_arithmetic alpha 0.5"))
    page.locator("#eval-limit input").fill("3")
    page.locator("#eval-btn").click()
    expect(page.locator("#status-evaluate")).to_contain_text("Done", timeout=120_000)
    expect(page.locator("#eval-table")).to_contain_text("compared: task_arithmetic alpha 0.5")
    page.locator("#eval-table").screenshot(path=str(OUT / "app_evaluate_two_merges.png"))


def test_the_same_example_clicked_twice_is_asked_twice(page):
    """(same page) an example clicked again once its answer is in asks it again (the box's value is the
    same, so a change-only trigger would drop it); both panes then show the newest answer."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="3 · Chat").click()
    example = page.locator(".gallery-item, [data-testid='examples'] button, .examples button, table.examples td")
    question = example.first.inner_text().strip()
    asked = page.locator("#chat-original [data-testid='user']").filter(has_text=question)
    answers = page.locator("#chat-original [data-testid='bot'], #chat-original .message.bot")
    before = asked.count()
    for n in (1, 2):
        example.first.click()
        expect(asked).to_have_count(before + n, timeout=90_000)
        expect(answers.last).to_contain_text("answered by", timeout=90_000)
    # both panes follow the newest answer: each pane's scrolling box (it overflows by now) ends at its bottom
    page.wait_for_timeout(1000)  # the pane scrolls once the answer's last chunk is drawn
    for pane in ("#chat-merged", "#chat-original"):
        boxes = page.locator(pane).evaluate("""root => [root, ...root.querySelectorAll('*')]
            .filter(e => /auto|scroll/.test(getComputedStyle(e).overflowY) && e.scrollHeight > e.clientHeight + 2)
            .map(e => [e.scrollTop, e.clientHeight, e.scrollHeight])""")
        assert boxes, f"{pane} does not overflow yet"
        top, seen, total = boxes[0]
        assert top + seen >= total - 4, (pane, boxes)  # scrolled to the newest answer
