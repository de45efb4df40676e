"""The worker's sweep and tune jobs: a method's knobs scored in place on the model the worker holds
(worker side).

Both merge the loaded VLM through its own InPlaceMerger (Loaded.merger), one knob setting after
another, never reloading it, and restore the checkpoint's weights at the end, after a cancel and
after an error (analysis.sweep.sweep and analysis.tune.Tuner restore in a `finally`). Their
progress does not let the chat lane in between steps: the weights are the sweep's, not a merge the
chat asked for. A sweep sends each point as a "partial" event as soon as it is scored.

A tune's study lives in <cache-dir>/tune/<key>, keyed by the triple's fingerprints and the settings,
so running it again continues the same study (each run adds its trials).
"""

from __future__ import annotations

from pathlib import Path

from analysis import sweep as sweep_mod
from analysis.cache import make_key
from merging.errors import LabError
from merging.merge_identity import triple_fingerprints
from merging.recipe import from_dict
from webapp.presets import TOY_ROOT
from webapp.protocol import SWEEP_LIMITS, TUNE_LIMITS, triple_of


def whole(args: dict, limits: dict) -> dict:
    """The job's numbers, checked against (lowest, highest, default); LabError naming the first bad one."""
    out = {}
    for name, (lo, hi, default) in limits.items():
        v = args.get(name, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not float(v).is_integer() or not lo <= v <= hi:
            raise LabError(f"{name.replace('_', ' ')}: {v!r} is not a whole number in {lo}..{hi}")
        out[name] = int(v)
    return out


def run_sweep(ctx, args: dict) -> dict:
    """{"method", "knob", "values", "limit", "points"}: each value merged in place and scored."""
    recipe = args.get("recipe")
    if not isinstance(recipe, dict):
        raise LabError("merge something first: the sweep varies one knob of this tab's recipe")
    s = whole(args, SWEEP_LIMITS)
    values = [float(v) for v in args.get("values") or []]
    if not 1 <= len(values) <= sweep_mod.MAX_POINTS:
        raise LabError(f"values: give 1 to {sweep_mod.MAX_POINTS} numbers")
    knob = str(args.get("knob") or "")
    recs = sweep_mod.recipes(recipe, knob, values)  # every value checked before the model is touched
    progress = ctx.progress()
    loaded = ctx.models.get(triple_of(recipe), progress)
    points = sweep_mod.sweep(loaded.merger, loaded.model, loaded.processor, recs, knob, TOY_ROOT / "eval",
                             s["limit"], progress=progress, cancel=ctx.flag, batch_size=16,
                             on_point=lambda p: ctx.send("partial", p))
    return {"method": recs[0].method, "knob": knob, "values": values, "limit": s["limit"], "points": points,
            "recipe": from_dict(recipe).to_dict()}


def tune_folder(cache_dir: str | None, triple: tuple, method: str, s: dict) -> Path:
    key = make_key("tune", {"fingerprints": triple_fingerprints(*triple), "method": method, **s})
    return Path(cache_dir or ".", "tune", key.split(":")[1][:16])


def run_tune(ctx, args: dict) -> dict:
    """analysis.tune.run on the loaded triple: {"result": pareto.json's dict, "folder"}."""
    # lazy: optuna (0.5 s) is imported by the tune job only, never by a worker that merges and chats.
    from analysis import tune

    s = whole(args, TUNE_LIMITS)
    method = str(args.get("method") or "")
    triple = tuple(triple_of(args["triple"]))
    if not triple[2]:
        raise LabError("tuning needs the triple's base model (the methods tuned are task-vector methods)")
    progress = ctx.progress()
    loaded = ctx.models.get(triple, progress)
    folder = tune_folder(ctx.cache_dir, triple, method, {"limit": s["limit"], "dev_items": s["dev_items"]})
    tuner = tune.Tuner(TOY_ROOT, folder, loaded.merger, loaded.model, loaded.processor, progress, ctx.flag)
    result = tune.run(tuner, method, s["trials"], s["seconds"] or None, s["limit"], s["dev_items"], s["test_limit"])
    return {"result": result, "folder": str(folder.resolve())}
