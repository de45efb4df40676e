"""`python -m analysis report RECIPE OUT_DIR`: every analysis that applies, as HTML + report.json.

Figures are standalone HTML with plotly.js embedded (they must open offline); the numbers go
into one report.json. The output folder is written by merging.output_folder.AtomicFolder (under a
temporary name, then renamed into place), so a crash or Ctrl-C never leaves a half-written
report, and OUT_DIR is never an input, a folder holding one, or a non-empty folder that is not
an earlier report (unless --overwrite). The analyses are analysis.analyses, run by
analysis.runner as the app runs them: same defaults, same cache entries (analysis.cache), so a
second report on the same triple, or one after the app analysed it, is fast; the merged model for
the change map and knockout is only built when one of them is not cached yet.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from analysis import analyses, runner
from merging.device import check_device
from merging.errors import WriteError
from merging.output_folder import AtomicFolder
from merging.recipe import load
from merging.writer import write_text


def _given(args, a) -> dict:
    """The knob values the command line set for analysis `a` (None: the registry's default)."""
    return {k.name: getattr(args, k.dest(a.name), None) for k in a.knobs}


def compute_all(recipe, args, progress, step, workdir: Path | None = None) -> tuple[dict, dict, dict]:
    """(results, skipped reasons, figures) of every registered analysis, through analysis.runner.
    `step(name)` marks the start of each analysis. workdir: where the temporary merged model goes
    (default: beside OUT_DIR); it is only built when an analysis of the merge is not cached."""
    source = runner.DiskSource(workdir or Path(args.out_dir).resolve().parent)
    job = runner.Job((recipe.vlm, recipe.reasoner, recipe.base), recipe, source, device=args.device,
                     cache_dir=args.cache_dir, progress=progress)
    results, skipped, figs = {}, {}, {}
    try:
        for name in analyses.names():
            step(name)
            a = analyses.get(name)
            reason = a.skip(job)
            if a.slow and not getattr(args, name, False):
                reason = f"not requested (add --{name}; {a.slow})"
            if reason:
                skipped[name] = reason
                continue
            results[name], _ = runner.run(name, job, _given(args, a))
            figs.update(runner.figures_of(name, results[name]))
    finally:
        source.close()
    return results, skipped, figs


def write_report(folder: Path, results: dict, skipped: dict, figs: dict, meta: dict) -> None:
    """The figures, report.json and index.html into `folder` (AtomicFolder's temp folder)."""
    for name, fig in figs.items():
        try:
            # include_plotlyjs=True embeds plotly.js (~4 MB): the file works offline and alone.
            fig.write_html(folder / f"{name}.html", include_plotlyjs=True, full_html=True)
        except OSError as e:
            raise WriteError(f"could not write {folder / name}.html: {e.strerror or e}") from None
    report = {**meta, "figures": {n: f"{n}.html" for n in figs}, "skipped": skipped, "results": results}
    write_text(folder / "report.json", json.dumps(report, indent=1, allow_nan=True))
    write_text(folder / "index.html", _index_html(figs, skipped, meta))


def _index_html(figs: dict, skipped: dict, meta: dict) -> str:
    links = "".join(f'<li><a href="{n}.html">{n.replace("_", " ")}</a></li>' for n in figs)
    skips = "".join(f"<li>{n}: {r}</li>" for n, r in skipped.items())
    r = meta["recipe"]
    return (f"<!doctype html><meta charset='utf-8'><title>merge-lab report</title>"
            f"<h1>merge-lab report</h1><p>VLM {r['vlm']}<br>reasoner {r['reasoner']}<br>base {r.get('base')}"
            f"<br>method {r['method']} {r.get('parameters', {})}</p><h2>Figures</h2><ul>{links}</ul>"
            f"<h2>Skipped</h2><ul>{skips or '<li>none</li>'}</ul><p>Numbers: <a href='report.json'>report.json</a></p>")


def main_report(args) -> int:
    recipe = load(args.recipe)
    check_device(args.device)
    inputs = (recipe.vlm, recipe.reasoner, recipe.base, args.recipe, *(args.attention_images or ()))
    t0 = time.perf_counter()
    # Entered first, so a bad OUT_DIR is refused before any analysis runs; an earlier report
    # there is replaced without --overwrite, anything else only with it.
    with AtomicFolder(args.out_dir, args.overwrite, inputs, kind="report",
                      replace_own=True) as tmp:
        results, skipped, figs, timings = _run_all(recipe, args, tmp)
        meta = {"recipe": recipe.to_dict(), "timings_s": timings}
        if "attention" in results:
            att = results["attention"]
            # Ready to paste into a frank recipe: either the per-layer list or the fitted decay.
            meta["frank_prior_v"] = att["prior_v"]
            meta["frank_parameters"] = {"use_prior": 1, "beta": round(att["beta"], 6)}
        write_report(tmp, results, skipped, figs, meta)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"report written to {Path(args.out_dir).resolve()} ({len(figs)} figures, {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    return 0


def _run_all(recipe, args, workdir: Path) -> tuple[dict, dict, dict, dict]:
    """compute_all with a progress bar; also the seconds each analysis took."""
    steps = analyses.names()
    timings: dict[str, float] = {}
    with tqdm(total=len(steps), desc="report", unit="analysis", file=sys.stderr, dynamic_ncols=True) as bar:
        state = {"name": None, "t": time.perf_counter()}

        def step(name):
            now = time.perf_counter()
            if state["name"] is not None:
                timings[state["name"]] = round(now - state["t"], 3)
                bar.update(1)
            state.update(name=name, t=now)
            bar.set_description(f"report: {name}")

        def progress(done, total, message):
            bar.set_postfix_str(f"{message} ({done}/{total})", refresh=True)

        results, skipped, figs = compute_all(recipe, args, progress, step, workdir)
        timings[state["name"]] = round(time.perf_counter() - state["t"], 3)
        bar.update(1)
    return results, skipped, figs, timings
