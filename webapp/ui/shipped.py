"""The results shipped with the bundled family (analysis.precomputed), shown without asking the worker.

A class opening the knockout or the leaderboard at the defaults gets the shipped result at once (the
panels start with it) and again when it presses the button at those settings, so no one waits behind
another user's run for numbers already computed. The key is the one the worker computes
(analysis.leaderboard.key_parts, the analysis' own key()), so other settings or other weights are never
served from it; a "compute live" tick sends the run to the worker anyway (UI side).
"""

from __future__ import annotations

from analysis import analyses, precomputed, runner
from analysis.leaderboard_key import key_parts
from merging import methods
from merging.errors import LabError
from webapp.presets import TOY_ROOT
from webapp.protocol import LEADERBOARD_LIMITS

LIVE_LABEL = "compute live (even where a precomputed result exists)"


def leaderboard_entry(args: dict) -> dict | None:
    """The shipped leaderboard for the run args (limit, dev_items, grid_size, methods), else None."""
    if not (TOY_ROOT / "vlm").is_dir():
        return None
    try:
        return precomputed.find("leaderboard", key_parts(
            TOY_ROOT, {k: args[k] for k in LEADERBOARD_LIMITS} | {"methods": args["methods"]}))
    except (LabError, OSError):  # unreadable weights: nothing shipped applies
        return None


def leaderboard_default() -> dict | None:
    """The shipped leaderboard at the panel's starting values (every method), else None."""
    return leaderboard_entry({k: v[2] for k, v in LEADERBOARD_LIMITS.items()} | {"methods": methods.names()})


def analysis_entry(name: str, triple: dict, recipe: dict | None, p: dict) -> dict | None:
    """The shipped result of analysis `name` on the triple's VLM (no merge) with knob values p, else None.
    Only analyses with a key(job, merged, p) (the knockout) ship results."""
    a = analyses.get(name)
    if recipe is not None or not hasattr(a, "key"):
        return None
    try:
        job = runner.Job((triple["vlm"], triple["reasoner"], triple.get("base")), None, None,
                         eval_dir=TOY_ROOT / "eval")
        return precomputed.find(name, a.key(job, False, a.params(p)))
    except (LabError, OSError):
        return None


def analysis_default(name: str) -> dict | None:
    """The shipped result of analysis `name` on the bundled VLM at its default knobs, else None."""
    if not (TOY_ROOT / "vlm").is_dir():
        return None
    triple = {"vlm": str(TOY_ROOT / "vlm"), "reasoner": str(TOY_ROOT / "math"), "base": str(TOY_ROOT / "base")}
    return analysis_entry(name, triple, None, {})


def analysis_view(name: str, e: dict) -> tuple[list, str]:
    """(figures, summary) of a shipped analysis result, as the worker's job would send them: the entry
    is the VLM's, which the analysis returns under "VLM" when there is no merge."""
    a = analyses.get(name)
    data, p = {"VLM": e["data"]}, a.params({k.name: e["key_parts"].get(k.name) for k in a.knobs})
    return list(runner.figures_of(name, data).values()), a.summary(data, p)


def status(e: dict, button: str) -> str:
    """The mark above a shipped result: what it is and how to compute it live instead."""
    return (f"{precomputed.mark(e)}. Change a setting, or tick **compute live**, and press **{button}** "
            "to compute it on this server.")
