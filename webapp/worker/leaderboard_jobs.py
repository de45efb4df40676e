"""The worker's leaderboard job: `python -m analysis leaderboard` on the bundled family, cached like the
analyses (worker side).

analysis.leaderboard loads its own copy of the family's VLM and merges that copy in place (its own
InPlaceMerger), so the model the worker holds for chat, merges and analyses, and its merger's
state and snapshots, are never touched. The result is cached under the family's checkpoint
fingerprints, a digest of its eval suites, the three numbers and the methods; the run's files
(leaderboard.md/.json/.html and the dev split) go to <cache-dir>/leaderboard/<key>. The result shipped
with the bundled family (analysis.precomputed) is served when its key is this one, unless args["live"].
Each method tuned in the app (<cache-dir>/tune, analysis.tune_results) adds a row: its tune's chosen point.
"""

from __future__ import annotations

from pathlib import Path

from analysis import leaderboard, precomputed, tune_results
from analysis.cache import cached, make_key
from analysis.leaderboard_key import key_parts
from merging import methods
from merging.errors import LabError
from webapp.presets import TOY_ROOT
from webapp.protocol import LEADERBOARD_LIMITS

# (lowest, highest, default) of the panel's three numbers
LIMITS = LEADERBOARD_LIMITS


def settings(args: dict) -> dict:
    """The run's numbers and methods, checked; LabError naming the first bad one."""
    out = {}
    for name, (lo, hi, default) in LIMITS.items():
        v = args.get(name, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not float(v).is_integer() or not lo <= v <= hi:
            raise LabError(f"{name.replace('_', ' ')}: {v!r} is not a whole number in {lo}..{hi}")
        out[name] = int(v)
    names = list(args.get("methods") or methods.names())
    unknown = [n for n in names if n not in methods.names()]
    if unknown:
        raise LabError(f"unknown method(s): {', '.join(unknown)}")
    out["methods"] = [n for n in methods.names() if n in names]  # registry order
    return out


def run_leaderboard(ctx, args: dict, family: Path = TOY_ROOT) -> dict:
    """{"result": leaderboard.run's dict, "cached": bool, "folder": where its files are}."""
    s = settings(args)
    if not (family / "vlm").is_dir():
        raise LabError("the bundled toy family is not on this machine")
    key = key_parts(family, s)
    out_dir = Path(ctx.cache_dir or ".", "leaderboard", make_key("leaderboard", key).split(":")[1][:16])
    progress = ctx.progress(yields=True)
    computed = []

    def compute() -> dict:
        computed.append(True)
        progress(0, 1, "building the dev split")
        return leaderboard.run(family, out_dir, s["limit"], s["dev_items"], s["methods"], progress=progress,
                               grid_size=s["grid_size"], cancel=ctx.flag)

    shipped = None if args.get("live") else precomputed.find("leaderboard", key)  # live: the user asked
    result = shipped["data"] if shipped else cached("leaderboard", key, compute, ctx.cache_dir)
    # a row per method tuned in this app (the Sweep & tune tab), its newest tune's chosen point
    tuned = tune_results.newest(Path(ctx.cache_dir or ".", "tune"), s["methods"])
    result = {**result, "entries": result["entries"] + tuned}
    return {"result": result, "cached": not computed, "folder": str(out_dir.resolve()),
            "precomputed": precomputed.mark(shipped) if shipped else None}
