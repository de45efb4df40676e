"""Load: 8 gradio_client clients merge, analyse and chat at once against one real app.

Every request must complete (queued, then answered) within its timeout, the app and its worker
must survive, no client may see another client's chat turns, and every pane's answer must be
that of the right weights: a plain generate() of the VLM checkpoint (original pane) or of the
tab's recipe merged to disk (merged pane), computed here after the run. The figures are printed and
written to tests/_output/load_measurements.json (docs/load_measurements.md records a run).

    .venv/bin/python -m pytest tests/test_load.py -s -q
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.app_fixtures import wait_worker
from tests.chat_reference import TOKENS, Reference, answer_text
from webapp.presets import DEFAULT as TOY_PRESET

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS, TIMEOUT = 8, 2, 240
OUT = Path(__file__).resolve().parent / "_output"


def _user_texts(messages: list[dict]) -> list[str]:
    out = []
    for m in messages:
        if m["role"] != "user":
            continue
        c = m["content"]
        parts = c if isinstance(c, list) else [c]
        text = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)
        if text:
            out.append(text)
    return out


def _session(url: str, i: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    calls, asked, seen, answers, recipe = [], [], None, [], None

    def call(what, **kw):
        t0 = time.monotonic()
        try:
            out = client.submit(**kw).result(timeout=TIMEOUT)
            ok, err = True, None
        except Exception as e:  # counted, reported
            out, ok, err = None, False, f"{type(e).__name__}: {e}"[:200]
        calls.append({"what": what, "client": i, "seconds": time.monotonic() - t0, "ok": ok, "error": err})
        return out

    for r in range(ROUNDS):
        alpha = round(0.1 + 0.05 * i + 0.01 * r, 2)
        out = call("merge", preset=TOY_PRESET, method="task_arithmetic", knob1=alpha, api_name="/merge")
        if out and "Merged with" not in out[0]:
            calls[-1].update(ok=False, error=out[0][:200])
        elif out:
            recipe = yaml.safe_load(out[1])
        out = call("similarity", preset=TOY_PRESET, rank=4 + i, api_name="/similarity")
        if out and not str(out[0]).startswith("✓"):
            calls[-1].update(ok=False, error=str(out[0])[:200])
        question = f"client {i} round {r} : what is {i} plus {r} ?"
        asked.append(question)
        out = call("chat", message={"text": question, "files": []}, preset=TOY_PRESET, max_new_tokens=TOKENS,
                   api_name="/chat")
        if out:
            seen = (_user_texts(out[0]), _user_texts(out[1]))
            answers.append({"recipe": recipe, "question": question, "merged": answer_text(out[0][-1]),
                            "original": answer_text(out[1][-1])})
    return {"calls": calls, "asked": asked, "seen": seen, "answers": answers}


def test_eight_clients_at_once(app_handle, toy_dir, tmp_path):
    pid = wait_worker(app_handle.proc.pid)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        sessions = list(pool.map(lambda i: _session(app_handle.url, i), range(CLIENTS)))
    wall = time.monotonic() - t0
    calls = [c for s in sessions for c in s["calls"]]
    lat = sorted(c["seconds"] for c in calls)
    q = statistics.quantiles(lat, n=10)
    figures = {"clients": CLIENTS, "rounds": ROUNDS, "requests": len(calls),
               "failures": sum(not c["ok"] for c in calls), "wall_s": round(wall, 1),
               "p50_s": round(statistics.median(lat), 2), "p90_s": round(q[8], 2), "max_s": round(lat[-1], 2),
               "by_kind": {k: {"n": len(v), "p50_s": round(statistics.median(v), 2), "max_s": round(max(v), 2)}
                           for k in ("merge", "similarity", "chat")
                           for v in [[c["seconds"] for c in calls if c["what"] == k]]}}
    print("\nload figures:", json.dumps(figures, indent=1))
    OUT.mkdir(exist_ok=True)
    (OUT / "load_measurements.json").write_text(json.dumps(figures, indent=1))
    assert figures["failures"] == 0, [c for c in calls if not c["ok"]]
    assert figures["requests"] == CLIENTS * ROUNDS * 3
    for s in sessions:  # each client's chat shows its own turns only, in order
        merged, original = s["seen"]
        assert merged == s["asked"] and original == s["asked"], (s["asked"], s["seen"])
    assert app_handle.proc.poll() is None
    assert wait_worker(app_handle.proc.pid) == pid  # the worker never had to restart
    ref = Reference(toy_dir, tmp_path)
    for s in sessions:  # each pane answered with the weights it names
        assert len(s["answers"]) == ROUNDS and all(a["recipe"] for a in s["answers"])
        for a in s["answers"]:
            assert a["original"] == ref.answer(None, a["question"]), a
            assert a["merged"] == ref.answer(a["recipe"], a["question"]), a
