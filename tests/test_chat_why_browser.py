"""The chat in a real headless Chromium: a question with a word the toy model does not know gets the
warning before its answers, and under the chat both panes' key-token probabilities.
The screenshot goes to tests/_output/chat_why.png (docs/chat_why.png is a copy of one, taken by hand)."""

from __future__ import annotations

import pytest

from tests.app_fixtures import SHOTS, chromium
from tests.paths import TOY

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_unknown_word_warning_and_key_token_table(app_url):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(app_url)
        expect(page.locator("#merge-btn")).to_be_enabled(timeout=120_000)
        page.locator("#merge-btn").click()
        expect(page.locator("#merge-status")).to_contain_text("Merged with", timeout=90_000)
        page.get_by_role("tab", name="3 · Chat").click()
        page.locator("#chat-box input[type=file]").set_input_files(str(TOY / "samples" / "sample_0.png"))
        box = page.locator("#chat-box textarea")
        box.fill("2 sqaures are taken away . how many squares are left ?")
        box.press("Enter")
        merged = page.locator("#chat-merged")
        expect(merged).to_contain_text("does not know 'sqaures'", timeout=60_000)
        expect(merged).to_contain_text("'sqaures' -> 'squares'")
        why = page.locator("#chat-why")
        expect(why.locator("table")).to_be_visible(timeout=120_000)
        for text in ("merged model", "original VLM", "count", "answer", "numbers 0-20"):
            expect(why).to_contain_text(text)
        page.locator("#chat-box").scroll_into_view_if_needed()
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / "chat_why.png"), full_page=True)
