"""A handout: one self-contained HTML file of a merge, for a class or a lab notebook.

`python -m analysis handout RECIPE OUT.html` (and the app's Handout button) writes the recipe, the
VLM's and the merge's scores on the bundled suites with 95% intervals and the paired difference,
every analysis figure with what it shows, and, from the app, the walkthrough's text beside them.
plotly.js is inlined once, so the file opens offline and alone; nothing in it is fetched.

The analyses and the scores go through analysis.runner's Job, so the CLI (models from disk) and the
worker (its loaded model) compute and cache them the same way.
"""

from __future__ import annotations

import html
import json
import re
import sys
import time
from collections.abc import Callable

from analysis import analyses, intervals, runner
from analysis.evaluate import SUITES, evaluate, is_vlm
from merging.device import check_device
from merging.hub import shown
from merging.output_folder import AtomicFile
from merging.recipe import load

GENERATOR = "merge-lab handout"  # the marker an earlier handout carries: only such a file is replaced
DEFAULT_LIMIT = 30  # items per suite: about a minute on a CPU for the bundled family


def scores(job: runner.Job, limit: int, progress: Callable | None = None) -> dict:
    """{suite: {"vlm": accuracy(), "merge": accuracy(), "diff": paired_difference()}} on the first
    `limit` items of each bundled suite, both models on the same items; cached under both weights."""
    key = {"vlm": job.weights_id(False), "merge": job.weights_id(True), "limit": limit,
           "eval_dir": str(job.eval_dir)}

    def compute() -> dict:
        per_model = {}
        for which, merged in (("vlm", False), ("merge", True)):
            with job.source.model(job, merged) as (model, proc):
                suites = [s for s in SUITES if is_vlm(model) or s == "text_math"]
                out = evaluate((model, proc), suites, limit, job.device, eval_dir=job.eval_dir,
                               return_items=True, stop_at_answer=True,
                               progress=(lambda d, t, m, w=which: progress(d, t, f"{w}: {m}")) if progress else None)
                per_model[which] = {s: [bool(r["correct"]) for r in recs] for s, recs in out["items"].items()}
        return {s: {"vlm": intervals.accuracy(per_model["vlm"][s]), "merge": intervals.accuracy(per_model["merge"][s]),
                    "diff": intervals.paired_difference(per_model["vlm"][s], per_model["merge"][s])}
                for s in per_model["vlm"]}

    return job.cached("handout_scores", key, compute)


def analyses_of(job: runner.Job, given: dict | None = None, skip_slow: bool = True) -> list[dict]:
    """[{name, title, about, figures: {file: Figure}} or {name, title, skipped}] for every analysis."""
    out = []
    for name in analyses.names():
        a = analyses.get(name)
        reason = a.skip(job) or (f"not run here ({a.slow})" if a.slow and skip_slow else None)
        if reason:
            out.append({"name": name, "title": a.title, "skipped": reason})
            continue
        result, _ = runner.run(name, job, (given or {}).get(name, {}))
        out.append({"name": name, "title": a.title, "about": a.about, "figures": runner.figures_of(name, result)})
    return out


# ------------------------------------------------------------------------------------------- HTML
def _text(md: str) -> str:
    """The little Markdown the lab's texts use (**bold**, *italic*, `code`, paragraphs), escaped first."""
    out = []
    for para in re.split(r"\n\s*\n", md.strip()):
        t = html.escape(para)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
        t = re.sub(r"(?<![*\w])\*([^*\n]+?)\*(?![*\w])", r"<i>\1</i>", t)
        out.append(f"<p>{t}</p>")
    return "".join(out)


def _scores_table(sc: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{intervals.fmt_acc(v['vlm'])}</td><td>{intervals.fmt_acc(v['merge'])}</td>"
        f"<td>{html.escape(intervals.fmt_diff(v['diff']))}</td><td>{v['vlm']['n']}</td></tr>" for s, v in sc.items())
    return ("<table><tr><th>suite</th><th>VLM [95% interval]</th><th>merge [95% interval]</th>"
            "<th>merge - VLM, points [95% paired bootstrap]</th><th>items</th></tr>" + rows + "</table>"
            "<p class=note>A difference whose interval holds 0 is within the noise of this many items.</p>")


def _recipe_block(recipe: dict) -> str:
    shown_recipe = {k: (shown(v) if k in ("vlm", "reasoner", "base") and v else v) for k, v in recipe.items()}
    return f"<pre>{html.escape(json.dumps(shown_recipe, indent=1))}</pre>"


def render(recipe: dict, sc: dict | None, parts: list[dict], lesson: list[dict] | None = None,
           title: str = "Merge lab handout") -> str:
    """The whole page. lesson: [{"title", "text"}] (the walkthrough's steps, from the app)."""
    # lazy: plotly's bundle (4 MB of JavaScript) is read only when a handout is written
    from plotly.offline import get_plotlyjs

    body = [f"<h1>{html.escape(title)}</h1><p class=note>{time.strftime('%Y-%m-%d %H:%M')}; "
            "every number was measured when this page was written.</p>", "<h2>The merge</h2>", _recipe_block(recipe)]
    if sc:
        body += ["<h2>Scores</h2>", _scores_table(sc)]
    for step in lesson or []:
        body += [f"<h2>{html.escape(step['title'])}</h2>", _text(step["text"])]
    for p in parts:
        body.append(f"<h2>{html.escape(p['title'])}</h2>")
        if "skipped" in p:
            body.append(f"<p class=note>Skipped: {html.escape(p['skipped'])}</p>")
            continue
        body.append(_text(p["about"]))
        body += [f.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})
                 for f in p["figures"].values()]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             ".note{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta name='generator' content='{GENERATOR}'>"
            f"<title>{html.escape(title)}</title><style>{style}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>{''.join(body)}</body></html>")


# -------------------------------------------------------------------------------------------- CLI
def main_handout(args) -> int:
    """`python -m analysis handout RECIPE OUT.html`: analyses from disk, scores, one HTML file."""
    recipe = load(args.recipe)
    check_device(args.device)
    t0 = time.perf_counter()
    with AtomicFile(args.out, GENERATOR, (recipe.vlm, recipe.reasoner, recipe.base, args.recipe)) as tmp:
        source = runner.DiskSource(tmp.parent)
        job = runner.Job((recipe.vlm, recipe.reasoner, recipe.base), recipe, source, device=args.device,
                         cache_dir=args.cache_dir)
        try:
            parts = analyses_of(job)
            sc = scores(job, args.limit)
        finally:
            source.close()
        tmp.write_text(render(recipe.to_dict(), sc, parts), encoding="utf-8")
    print(f"handout written to {args.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
