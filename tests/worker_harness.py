"""An in-process worker on the bundled toy family, shared by the worker's job tests: its fixtures (a pytest
plugin, named in conftest.py) and run(), which drives one job as the UI's client does (events read until
the job ends, a cancel sent by id)."""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field

import pytest
import torch

from webapp.presets import TOY_ROOT
from webapp.worker.models import load_serving
from webapp.worker.process import Worker

TRIPLE = {"vlm": str(TOY_ROOT / "vlm"), "reasoner": str(TOY_ROOT / "math"), "base": str(TOY_ROOT / "base")}
RECIPE = {**TRIPLE, "method": "task_arithmetic", "parameters": {"alpha": 0.8}}
_ids = itertools.count(1)


@dataclass
class Seen:
    """What a job sent before it ended."""

    progress: list = field(default_factory=list)  # (done, total, message) per progress event
    partial: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # {"stream", "text"} per streamed piece


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    torch.set_num_threads(1)
    w = Worker(queue.Queue(), queue.Queue(), {"device": "cpu", "cache_dir": str(tmp_path_factory.mktemp("cache"))})
    yield w
    w.models.loaded and w.models.loaded.close()


@pytest.fixture(scope="module")
def checkpoint():
    """The VLM's state dict as the worker serves it, loaded on its own."""
    model, _ = load_serving(TRIPLE["vlm"], "cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(w: Worker, kind: str, args: dict, cancel_at: int | None = None) -> tuple[str, object, Seen]:
    """(terminal event, its payload, what came before); cancel_at: cancel at that progress event."""
    job_id = next(_ids)
    t = threading.Thread(target=w.handle, args=({"id": job_id, "kind": kind, "args": args},))
    t.start()
    seen = Seen()
    while True:
        jid, ev, payload = w.events.get(timeout=600)
        assert jid == job_id
        if ev in ("progress", "partial", "token"):
            getattr(seen, {"progress": "progress", "partial": "partial", "token": "tokens"}[ev]).append(payload)
        if ev == "progress" and len(seen.progress) == cancel_at:
            w.control.put(job_id)
        if ev in ("result", "error", "cancelled"):
            t.join()
            return ev, payload, seen


def same_as(w: Worker, state: dict) -> bool:
    """The worker's live weights equal `state`, bit for bit."""
    live = w.models.loaded.model.state_dict()
    return live.keys() == state.keys() and all(torch.equal(live[k], state[k]) for k in live)
