"""Finished tunes as leaderboard rows (no optuna here: the leaderboard and the UI read pareto.json only).

A tune folder's pareto.json (analysis.tune) holds the point its selection rule chose on dev (perception
within 3 points of the VLM's, then the highest visual_math) and that point's held-out scores; each
method with a tune gets one row, from its newest pareto.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from merging import methods
from merging.errors import LabError


def entry(result: dict) -> dict:
    """The chosen point as a leaderboard entry (analysis.leaderboard.Entry's fields; ci: its 95% Wilson
    intervals; no paired difference from the VLM: the tune's held-out items are its own count)."""
    b = result["best"]
    n = b["test"].get("perception", next(iter(b["test"].values())))["n"]
    return {"method": result["method"], "label": f"tuned ({result['trials']} trials, {n} held-out items)",
            "knobs": b["knobs"], "dev": {s: v["acc"] for s, v in b["dev"].items()},
            "test": {s: v["acc"] for s, v in b["test"].items()}, "details": "",
            "ci": {s: [v["lo"], v["hi"]] for s, v in b["test"].items()}}


def read(folder: Path) -> dict:
    """A tune folder's pareto.json (`leaderboard --tuned DIR`); LabError naming the folder when it has none."""
    path = Path(folder) / "pareto.json"
    try:
        result = json.loads(path.read_text())
        whole = isinstance(result["best"]["knobs"], dict) and isinstance(result["settings"]["num_layers"], int)
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        raise LabError(f"--tuned {folder}: no readable pareto.json there (run `python -m analysis tune "
                       f"--out {folder}` first)")
    if result.get("method") not in methods.names():
        raise LabError(f"--tuned {folder}: its method {result.get('method')!r} is not a merge method here")
    return result


def newest(root: Path, names) -> list[dict]:
    """One entry per method in `names` with a pareto.json under root/*/, the newest of each."""
    found: dict[str, tuple[float, dict]] = {}
    for path in Path(root).glob("*/pareto.json"):
        try:
            result = json.loads(path.read_text())
            when = path.stat().st_mtime
        except (OSError, ValueError):
            continue  # a half-gone folder: no row rather than an error
        m = result.get("method")
        if m in names and (m not in found or when > found[m][0]):
            found[m] = (when, result)
    return [entry(found[m][1]) for m in names if m in found]
