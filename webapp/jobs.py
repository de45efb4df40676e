"""What travels between the UI process and the worker process: plain picklable data only.

Request: {"id": int, "kind": str, "args": dict}; the worker runs requests one at a time, FIFO.
Event:   (job_id, type, payload) with type one of
    started   - the worker picked the job up (payload: None)
    progress  - (done, total, message)
    token     - a piece of generated text (payload: {"stream": "merged"|"original", "text": str})
    notice    - one line the user should see, e.g. how a prompt was cut to fit the context (payload: str)
    result    - the job's answer (payload: dict); terminal
    error     - one-line message; terminal
    cancelled - one-line message; terminal
"""

from __future__ import annotations

import hashlib
import json

TERMINAL = ("result", "error", "cancelled")


class Cancelled(Exception):
    """Raised inside the worker when the job's cancel flag is seen."""


def recipe_key(recipe: dict | None) -> str | None:
    """A short stable hash of a recipe dict; None for "the original VLM"."""
    if recipe is None:
        return None
    text = json.dumps(recipe, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def triple_of(recipe: dict) -> tuple[str, str, str | None]:
    return recipe["vlm"], recipe["reasoner"], recipe.get("base")
