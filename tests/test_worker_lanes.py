"""The worker's two lanes, in process on the bundled toy family: a chat turn sent while an
evaluation runs is answered before the evaluation ends, and both answers are the ones each job
gives alone (the evaluation gets its weights back after the chat)."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from webapp.jobs import lane_of
from webapp.presets import TOY_ROOT
from webapp.worker import Lanes, Worker

TRIPLE = {"vlm": str(TOY_ROOT / "vlm"), "reasoner": str(TOY_ROOT / "math"), "base": str(TOY_ROOT / "base")}
RECIPE = {**TRIPLE, "method": "task_arithmetic", "parameters": {"alpha": 0.8}}
EVAL = {"recipe": RECIPE, "triple": TRIPLE, "suites": ["perception", "visual_math"], "limit": 96}
CHAT = {"recipe": {**RECIPE, "parameters": {"alpha": 0.5}}, "triple": TRIPLE, "max_new_tokens": 8,
        "question": "what is 3 plus 4 ?"}


def start(tmp_path):
    torch.set_num_threads(1)
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path)})
    requests = queue.Queue()
    th = threading.Thread(target=w.run, args=(requests,), daemon=True)
    th.start()
    return w, requests, th


def results(w, want: set[int]) -> tuple[list[int], dict, list]:
    """(job ids in the order they ended, their payloads, every event) until all of `want` ended."""
    order, payloads, events = [], {}, []
    while set(order) != want:
        jid, ev, payload = w.events.get(timeout=600)
        events.append((jid, ev))
        if ev in ("result", "error", "cancelled"):
            assert ev == "result", payload
            order.append(jid)
            payloads[jid] = payload
    return order, payloads, events


def test_lanes_take_chat_first_and_keep_each_lane_in_order():
    lanes = Lanes()
    for i, kind in enumerate(["evaluate", "chat", "analysis", "merge", "chat"]):
        lanes.put({"id": i, "kind": kind})
    assert [lanes.next()["id"] for _ in range(5)] == [1, 3, 4, 0, 2]
    assert lane_of("export") == "long" and lane_of("ping") == "chat"
    lanes.put({"id": 9, "kind": "chat"})
    lanes.put({"id": 10, "kind": "chat"})
    assert [r["id"] for r in lanes.take_chat(lambda r: r["id"] == 10)] == [10]
    lanes.put(None)
    assert lanes.next() is None


@pytest.mark.slow
def test_chat_is_answered_between_the_steps_of_an_evaluation(tmp_path):
    w, requests, th = start(tmp_path / "busy")
    requests.put({"id": 1, "kind": "chat", "args": {**CHAT, "recipe": RECIPE}})  # loads the triple
    results(w, {1})
    requests.put({"id": 2, "kind": "evaluate", "args": EVAL})
    while True:  # the evaluation is scoring
        jid, ev, payload = w.events.get(timeout=600)
        if jid == 2 and ev == "progress" and payload[0] > 0:
            break
    requests.put({"id": 3, "kind": "chat", "args": CHAT})
    order, busy, events = results(w, {2, 3})
    assert order == [3, 2], "the chat waited for the whole evaluation"
    # The evaluation went on after the chat: progress of job 2 came after the chat's result.
    after = events[events.index((3, "result")):]
    assert (2, "progress") in after
    requests.put(None)
    th.join(30)

    alone, requests, th = start(tmp_path / "alone")  # the same jobs, one at a time, on a fresh worker
    requests.put({"id": 2, "kind": "evaluate", "args": EVAL})
    requests.put({"id": 3, "kind": "chat", "args": CHAT})
    _, quiet, _ = results(alone, {2, 3})
    requests.put(None)
    th.join(30)
    assert busy[2]["accuracy"] == quiet[2]["accuracy"]
    assert busy[3]["answers"] == quiet[3]["answers"]
    assert set(busy[3]["answers"]) == {"merged", "original"}
