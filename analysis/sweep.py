"""One knob of a recipe as a curve (`python -m analysis sweep RECIPE --knob alpha --values 0,0.5,1`).

The VLM is loaded once and merged in place (merging.inplace.InPlaceMerger) at each value of the
knob, with the recipe's other knobs as they are; each point is scored on the eval suites and gets
a 95% Wilson interval per suite (analysis.intervals). The merger is restored after the last point,
and after a cancel or an error, so the model it was given holds the checkpoint's weights again.
The app's worker runs the same `sweep` on the model it holds (webapp/worker/tune_jobs.py).

Output (atomic, merging.output_folder.AtomicFolder): OUT/sweep.json and OUT/sweep.html (plotly,
self-contained); a PNG as well only where kaleido is installed (sweep.json's "plots" says which).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from analysis.evaluate import EVAL_DIR, SUITES, evaluate, is_vlm, load_model
from analysis.intervals import accuracy
from analysis.knob_figures import sweep_figure, write_plots
from merging import methods
from merging.errors import Cancelled, LabError
from merging.inplace import InPlaceMerger
from merging.output_folder import AtomicFolder
from merging.recipe import from_dict, read_yaml

MAX_POINTS = 24


def parse_values(text: str) -> list[float]:
    """"0,0.25,0.5,1" -> [0.0, 0.25, 0.5, 1.0]; LabError naming the bad item."""
    out = []
    for part in str(text).split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise LabError(f"--values: {part.strip()!r} is not a number (give e.g. 0,0.25,0.5,1)") from None
    if not 1 <= len(out) <= MAX_POINTS:
        raise LabError(f"--values: {len(out)} values; give 1 to {MAX_POINTS}")
    return out


def recipes(base: dict, knob: str, values: list[float], recipe_dir: Path | None = None) -> list:
    """One checked Recipe per value (every value refused before any model loads)."""
    params = dict(base.get("parameters") or {})
    first = from_dict(base, recipe_dir)
    spec = {p.name: p for p in methods.get(first.method).params}
    if knob not in spec:
        raise LabError(f"--knob {knob!r} is not a knob of {first.method}; its knobs: {', '.join(spec)}")
    if spec[knob].integer:
        values = [int(v) if float(v).is_integer() else v for v in values]  # an int knob's 1.0 is 1
    return [from_dict({**base, "parameters": {**params, knob: v}}, recipe_dir) for v in values]


def suites_of(model) -> list[str]:
    return [s for s in SUITES if is_vlm(model) or s == "text_math"]


def score_live(model, proc, eval_dir: Path, limit: int | None, suites: list[str], progress=None,
               batch_size: int = 64) -> dict:
    """suite -> {"acc", "k", "n", "lo", "hi"} of the model as it is now."""
    out = evaluate((model, proc), suites=suites, limit=limit, eval_dir=eval_dir, progress=progress,
                   return_items=True, batch_size=batch_size)
    return {s: accuracy([r["correct"] for r in recs]) for s, recs in out["items"].items()}


def sweep(merger: InPlaceMerger, model, proc, recs: list, knob: str, eval_dir: Path = EVAL_DIR,
          limit: int | None = None, progress: Callable | None = None, cancel: Callable | None = None,
          on_point: Callable[[dict], None] | None = None, batch_size: int = 64) -> list[dict]:
    """Each recipe merged in place and scored; on_point(point) as each is done. The merger holds
    the original weights when this returns or raises."""
    suites = suites_of(model)
    points = []
    n = len(recs)

    def check(done=0, total=1, message=""):
        if cancel is not None and cancel():
            raise Cancelled("cancelled")

    try:
        for i, rec in enumerate(recs):
            value = rec.parameters[knob]
            t0 = time.monotonic()
            merger.apply(rec, cancel=cancel)

            def part(done, total, message, i=i, value=value):
                check()
                if progress:
                    progress(i * total + done, n * total, f"{knob} {value:g}: {message}")

            point = {knob: value, "value": value, **score_live(model, proc, eval_dir, limit, suites, part,
                                                                batch_size),
                     "seconds": round(time.monotonic() - t0, 2)}
            merger.restore()
            points.append(point)
            if on_point is not None:
                on_point(point)
    finally:
        merger.restore()
    return points


def main_sweep(args) -> int:
    data, here = read_yaml(args.recipe)
    values = parse_values(args.values)
    recs = recipes(data, args.knob, values, here)
    torch.set_num_threads(args.threads)
    quiet_loading()
    out = Path(args.out_dir)
    refs = [r for r in (recs[0].vlm, recs[0].reasoner, recs[0].base) if r]
    with AtomicFolder(out, inputs=refs, kind="sweep", replace_own=True) as tmp:
        model, proc = load_model(recs[0].vlm, args.device)
        merger = InPlaceMerger.from_recipe(model, recs[0], device=args.device)
        t0 = time.monotonic()
        points = sweep(merger, model, proc, recs, args.knob, EVAL_DIR, args.limit,
                       on_point=lambda p: print(f"{args.knob} {p['value']:g}: " + _line(p), flush=True))
        result = {"method": recs[0].method, "knob": args.knob, "values": values, "limit": args.limit,
                  "recipe": from_dict(data, here).to_dict(), "points": points, "seconds": round(time.monotonic() - t0, 1)}
        result["plots"] = write_plots(sweep_figure(result), tmp, "sweep")
        (tmp / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}/sweep.json and {', '.join(result['plots'])}"
          + ("" if len(result["plots"]) > 1 else " (no PNG: kaleido is not installed)"))
    return 0


def quiet_loading() -> None:
    """No weight-loading bars on stderr: it is for the one line that says what went wrong."""
    # lazy: transformers (0.9 s after torch) is loaded by the model load right after this anyway.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _line(point: dict) -> str:
    return "  ".join(f"{s} {100 * point[s]['acc']:.1f} [{100 * point[s]['lo']:.1f}, {100 * point[s]['hi']:.1f}]"
                     for s in SUITES if s in point)
