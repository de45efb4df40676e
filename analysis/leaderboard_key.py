"""What a leaderboard result is keyed under: in the worker's cache and in a shipped result's file
(analysis.precomputed), here so the app's panel can tell without the worker whether one applies."""

from __future__ import annotations

import hashlib
from pathlib import Path

from analysis.evaluate import SUITES
from analysis.leaderboard import DEV_SEED
from merging import methods
from merging.inplace import triple_fingerprints


def key_parts(family: Path, s: dict) -> dict:
    """The three checkpoints (their fingerprints: file contents, never paths or times), the eval
    items and the settings s (limit, dev_items, grid_size, methods)."""
    digest = hashlib.sha256()
    for suite in SUITES:
        digest.update((family / "eval" / f"{suite}.jsonl").read_bytes())
    fps = triple_fingerprints(str(family / "vlm"), str(family / "math"), str(family / "base"))
    s = {**s, "methods": [n for n in methods.names() if n in s["methods"]]}  # registry order
    # "outcomes": results stored since each entry keeps its items' outcomes and intervals
    return {"fingerprints": fps, "eval": digest.hexdigest(), "dev_seed": DEV_SEED, "outcomes": 1, **s}
