"""The worker's two lanes, in process on the bundled toy family: a chat turn sent while an
evaluation runs is answered before the evaluation ends, and both answers are the ones each job
gives alone (the evaluation gets its weights back after the chat)."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from webapp.presets import TOY_ROOT
from webapp.protocol import lane_of
from webapp.worker.lanes import Lanes
from webapp.worker.process import Worker

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


def test_long_jobs_take_turns_across_tabs():
    """Tab a queues three leaderboards, then tab b one evaluation: b's runs second, not fourth."""
    lanes = Lanes()
    for i, session in enumerate(["a", "a", "a", "b"]):
        lanes.put({"id": i, "kind": "leaderboard" if session == "a" else "evaluate", "session": session})
    assert [lanes.next()["id"] for _ in range(4)] == [0, 3, 1, 2]


def test_one_tab_cannot_fill_the_queue():
    from webapp.ui.client import MAX_LONG, MAX_LONG_PER_SESSION, Job, WorkerClient

    client = WorkerClient({"device": "cpu"})  # never started: refusal() reads only the client's own jobs
    for i in range(MAX_LONG_PER_SESSION):
        client._jobs[i] = Job(i, "leaderboard", "tab-a")
    assert client.refusal("chat", "tab-a") is None and client.refusal("merge", "tab-a") is None
    why = client.refusal("evaluate", "tab-a")
    assert why.startswith(f"this tab already has {MAX_LONG_PER_SESSION} long job(s) running or waiting (leaderboard)")
    job = client.submit("evaluate", {}, "tab-a")  # refused at once, as a finished job saying why
    assert job.done and list(client.follow(job)) == [("error", why)]
    assert client.refusal("evaluate", "tab-b") is None
    for i in range(MAX_LONG_PER_SESSION, MAX_LONG):
        client._jobs[i] = Job(i, "analysis", f"tab-{i}")
    assert client.refusal("evaluate", "tab-b").startswith(f"the worker already has {MAX_LONG} long jobs")
    client._jobs[0].done = True  # one ends: room again
    assert client.refusal("evaluate", "tab-b") is None


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


def test_a_triple_that_cannot_fit_is_refused_before_loading(tmp_path):
    """The plan is made from the checkpoints' headers first: over the memory limit the merge fails
    with one line saying how much to free, and no model is loaded."""
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path), "max_memory_gib": 0.01})
    w.handle({"id": 1, "kind": "plan", "args": {"triple": TRIPLE}})
    w.handle({"id": 2, "kind": "merge", "args": {"recipe": RECIPE}})
    events = [w.events.get(timeout=60) for _ in range(w.events.qsize())]
    plan = next(p for jid, ev, p in events if jid == 1 and ev == "result")
    assert not plan["fits"] and "free" in plan["lines"][0] and len(plan["lines"]) == 1
    error = next(p for jid, ev, p in events if jid == 2 and ev == "error")
    assert "GiB of host RAM" in error and "free" in error and "\n" not in error
    assert w.models.loaded is None


def test_the_plan_says_what_frism_and_drift_would_hold_beside_the_served_model(tmp_path):
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path)})
    w.handle({"id": 1, "kind": "plan", "args": {"triple": TRIPLE}})
    plan = next(p for jid, ev, p in (w.events.get(timeout=60) for _ in range(w.events.qsize())) if ev == "result")
    frism, drift = plan["lines"][-2:]
    assert plan["fits"] and frism.startswith("frism's gate learning, every layer gated: ")
    assert "of input copies let go while it learns): fits" in frism  # the toy's inputs are held in RAM
    assert drift.startswith("a DRIFT fine-tune: ") and drift.endswith("free beside the served model: fits")


def test_the_plan_command_prints_the_plan_and_refuses_with_exit_2(tmp_path, capsys):
    from merging.__main__ import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in {**TRIPLE, "method": "ties"}.items()))
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    # the toy's inputs are small: held in RAM (a real model's are read from the files at each merge)
    assert "live model:" in out and "inputs: host RAM (the CPU is the device)" in out
    assert "frism's gate learning, every layer gated:" in out and "a DRIFT fine-tune:" in out  # their needs too
    assert main(["plan", str(recipe), "--gpu-gib", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: vlm needs") and "cuda memory" in err and "\n" not in err


def test_cpu_bfloat16_serving_is_opt_in(tmp_path):
    """--cpu-dtype bfloat16 serves the model in bf16 (half the memory), and merges and restores
    in it; float32 stays the default."""
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path), "cpu_dtype": "bfloat16"})
    w.handle({"id": 1, "kind": "merge", "args": {"recipe": RECIPE}})
    w.handle({"id": 2, "kind": "chat", "args": CHAT})
    ends = [(jid, ev) for jid, ev, _ in (w.events.get(timeout=60) for _ in range(w.events.qsize()))
            if ev in ("result", "error", "cancelled")]
    assert ends == [(1, "result"), (2, "result")]
    loaded = w.models.loaded
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert Worker(queue.Queue(), queue.Queue(), {"device": "cpu"}).models.cpu_dtype == "float32"
