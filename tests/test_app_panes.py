"""Each chat pane answers with the right weights, with several clients at once.

Clients merge (full and layer-limited merges), ask the same question twice (the second ask used to
come from a snapshot, after which the "Original VLM" pane answered with the merge for everyone),
and one client never merges. Every answer is checked against a plain greedy generate() in this
process: the original pane against the VLM checkpoint, the merged pane against the folder the
streaming engine writes for the tab's recipe (both loaded with from_pretrained).

    .venv/bin/python -m pytest tests/test_app_panes.py -q
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.app_fixtures import wait_worker
from tests.chat_reference import TOKENS, Reference, answer_text
from webapp.presets import DEFAULT as TOY_PRESET

pytestmark = pytest.mark.slow

TIMEOUT = 240
Q_MATH = "mia has 7 birds and gets 9 . how many birds does mia have now ?"
Q_COUNT = "how many circles are there ?"
# Per client: ("merge", method, alpha, first layer, last layer) or ("chat", question).
PLANS = [
    [("merge", "linear", 0.9, 0, 3), ("chat", Q_MATH), ("chat", Q_MATH), ("merge", "linear", 0.9, 0, 1),
     ("chat", Q_COUNT), ("chat", Q_COUNT)],
    [("merge", "task_arithmetic", 1.0, 0, 3), ("chat", Q_COUNT), ("chat", Q_COUNT), ("chat", Q_MATH)],
    [("merge", "linear", 0.5, 0, 3), ("chat", Q_MATH), ("merge", "task_arithmetic", 0.8, 2, 3),
     ("chat", Q_MATH), ("chat", Q_MATH)],
    [("chat", Q_MATH), ("chat", Q_COUNT), ("chat", Q_MATH), ("chat", Q_COUNT)],  # never merges
]


def _client_run(url: str, plan) -> list[dict]:
    """What this client saw: per chat, the tab's recipe (None before any merge) and both answers."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    recipe, seen = None, []
    for act in plan:
        if act[0] == "merge":
            _, method, alpha, first, last = act
            out = client.submit(preset=TOY_PRESET, method=method, knob1=alpha, first_layer=first, last_layer=last,
                                api_name="/merge").result(timeout=TIMEOUT)
            assert f"Merged with {method}" in out[0], out[0]
            recipe = yaml.safe_load(out[1])
            continue
        merged, original, *_ = client.submit(message={"text": act[1], "files": []}, preset=TOY_PRESET,
                                             max_new_tokens=TOKENS, api_name="/chat").result(timeout=TIMEOUT)
        seen.append({"recipe": recipe, "question": act[1], "merged": answer_text(merged[-1]),
                     "original": answer_text(original[-1])})
    return seen


def test_each_pane_answers_with_the_right_weights(app_handle, toy_dir, tmp_path):
    from webapp.ui.chat_panel import NO_MERGE

    pid = wait_worker(app_handle.proc.pid)
    with ThreadPoolExecutor(len(PLANS)) as pool:
        runs = list(pool.map(lambda plan: _client_run(app_handle.url, plan), PLANS))
    ref = Reference(toy_dir, tmp_path)
    differ = 0
    for i, seen in enumerate(runs):
        for s in seen:
            want_original = ref.answer(None, s["question"])
            assert s["original"] == want_original, (i, s)
            if s["recipe"] is None:
                assert s["merged"] == NO_MERGE.strip(), (i, s)
                continue
            want_merged = ref.answer(s["recipe"], s["question"])
            assert s["merged"] == want_merged, (i, s)
            differ += want_merged != want_original
    assert differ >= 4  # the merges answer differently, so a pane with the wrong weights shows
    assert app_handle.proc.poll() is None and wait_worker(app_handle.proc.pid) == pid
