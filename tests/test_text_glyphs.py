"""The app's text uses no emoji: without an emoji font (a plain Debian or a locked-down lab machine)
they render as empty boxes. Status marks are text symbols every common UI font has (✓ ✗ ■ ○ ⚠)."""

from __future__ import annotations

import unicodedata

from tests.paths import ROOT

# Emoji blocks, and the variation selector that turns a text symbol (⚠) into its emoji form (⚠️)
EMOJI = [(0x1F000, 0x1FAFF), (0x2300, 0x23FF), (0xFE0F, 0xFE0F), (0x2B50, 0x2B55)]
EMOJI_PRESENTATION = set("✅❌⛔⭐⚡✨❓❗")  # default-emoji symbols outside those blocks


def emoji_in(text: str) -> list[str]:
    return [c for c in text if any(lo <= ord(c) <= hi for lo, hi in EMOJI) or c in EMOJI_PRESENTATION]


def test_the_checker_sees_emoji():
    assert emoji_in("✅ done ⏳ ⚠️ ok") == ["✅", "⏳", "\ufe0f"]
    assert emoji_in("✓ Merged ✗ failed ■ Cancelled ○ Waiting ⚠ warning") == []


def test_no_emoji_in_the_app_text():
    found = []
    for path in [ROOT / "app.py", *sorted((ROOT / "webapp").glob("*.py")), *sorted((ROOT / "analysis").glob("*.py"))]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for c in emoji_in(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {unicodedata.name(c, hex(ord(c)))}")
    assert not found, "\n".join(found)
