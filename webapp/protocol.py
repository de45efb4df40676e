"""What travels between the UI process and the worker process: plain picklable data only.

Request: {"id": int, "kind": str, "args": dict}. The worker runs one job at a time, in two lanes,
each FIFO: the chat lane (merges, chat turns) goes first, and is also served between the steps of
a long job (analyses, evaluations, the leaderboard, DRIFT, exports), which then gets its weights back.
Event:   (job_id, type, payload) with type one of
    started   - the worker picked the job up (payload: None)
    progress  - (done, total, message)
    token     - a piece of generated text (payload: {"stream": "merged"|"original", "text": str})
    notice    - one line the user should see, e.g. how a prompt was cut to fit the context (payload: str)
    partial   - a piece of a long job's result as soon as it is computed, e.g. a sweep's point (payload: dict)
    result    - the job's answer (payload: dict); terminal
    error     - one-line message; terminal
    cancelled - one-line message; terminal
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

# The one cancel error, re-exported: the worker raises it when a job's cancel flag is seen, and
# merging's own cancel checks raise the same class.
from merging.errors import Cancelled as Cancelled

if TYPE_CHECKING:  # the annotation only: jobs stays free of torch for the UI process's client
    from merging.drift import DriftResult

TERMINAL = ("result", "error", "cancelled")
# The module the spawned worker process runs. Named, not imported: the UI process never loads the
# worker's code (nor torch through it); the child imports it after the spawn.
WORKER_MAIN = "webapp.worker.process"

# Bounds of the long jobs' arguments, checked by the panel before sending and by the worker on receipt.
EVAL_MAX_LIMIT = 300  # items per bundled suite (each has 300)
LEADERBOARD_LIMITS = {"limit": (1, 300, 30), "dev_items": (1, 200, 20), "grid_size": (0, 12, 2)}
# (lowest, highest, default): a sweep's items per suite; a tune's trials per run, seconds (0: no limit),
# dev items scored per trial, dev split size, held-out items per suite for the chosen point
SWEEP_LIMITS = {"limit": (1, 300, 20)}
TUNE_LIMITS = {"trials": (1, 200, 20), "seconds": (0, 3600, 0), "limit": (1, 200, 30),
               "dev_items": (1, 200, 100), "test_limit": (1, 300, 100)}


def spawned_main(*args) -> None:
    """The worker process's entry point as the UI's spawn context sees it (picklable, top level)."""
    importlib.import_module(WORKER_MAIN).main(*args)

CHAT_LANE = ("ping", "plan", "merge", "chat")  # what a person waits on while typing: never behind a long job


def lane_of(kind: str) -> str:
    return "chat" if kind in CHAT_LANE else "long"


def recipe_key(recipe: dict | None) -> str | None:
    """A short stable hash of a recipe dict; None for "the original VLM"."""
    if recipe is None:
        return None
    text = json.dumps(recipe, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DriftRun:
    """A finished DRIFT run where the chat's left side and the Evaluate tab would take a merge
    recipe: the fine-tune's result, and the triple it was run on as the UI named it (the original
    VLM beside it is that triple's, loaded and cached like a merge's)."""

    result: DriftResult
    triple: tuple[str, str, str | None]

    @property
    def folder(self) -> str:
        return self.result.folder

    @property
    def label(self) -> str:
        """Short form for chat and score labels: 'DRIFT (absolute, alpha 0.5), 40 steps, lr 0.0001'."""
        s = self.result.settings
        what = "Plain fine-tune" if s["alpha"] == 0 else f"DRIFT ({s['mode']}, alpha {s['alpha']:g})"
        return f"{what}, {s['steps']} steps, lr {s['lr']:g}"


def triple_of(variant: dict | DriftRun) -> tuple[str, str, str | None]:
    """(vlm, reasoner, base) of a merge recipe or a DRIFT run."""
    if isinstance(variant, DriftRun):
        return variant.triple
    return variant["vlm"], variant["reasoner"], variant.get("base")
