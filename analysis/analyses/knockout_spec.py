"""Layer knockout (BR2V) of the VLM, and of the recipe's merge when there is one."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

from analysis import knockout
from analysis.analyses import Analysis, Figure, Knob, register
from analysis.evaluate import evaluate
from merging.errors import Cancelled
from merging.recipe import knobs_text

# 40 items a suite: a 95% interval of about +-15 points at 50% (+-9 at 90%), against +-30 at 8 items
# whose steps were 12.5 points; 166 s for the VLM and a merge through the app's worker on 2 shared cores.
DEFAULT_LIMIT = 40


def _named(recipe) -> str:
    """'task_arithmetic alpha 1': the method and its knobs, so the legend says which merge was knocked out."""
    return f"{recipe.method} {knobs_text(recipe.parameters)}".strip()


def eval_key(eval_dir: Path) -> str:
    """Content hash of the eval suites, so knockout results follow regenerated suites."""
    h = hashlib.sha256()
    for f in sorted(Path(eval_dir).glob("*.jsonl")) if Path(eval_dir).is_dir() else []:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:24]


@register
class Knockout(Analysis):
    name = "knockout"
    title = "Layer knockout"
    about = ("Accuracy drop when one layer's attention or MLP is replaced by a constant (BR2V's test of where "
             "perception and reasoning live), beside the drop of a text-only control (text_math, no image): a "
             "layer whose knockout drops the control as much has broken the model, not its perception. "
             "Shaded: 95% intervals. Slow: one evaluation per layer.")
    knobs = (Knob("limit", DEFAULT_LIMIT, "eval items per suite", "VLM, plus this tab's merged model when there is one",
                  lo=1, hi=300, api="items_per_suite"),)  # 300: every item of a toy suite
    figures = (Figure("knockout_figure", "knockout", "Layer knockout", "plot-knockout"),)
    on_merge = True
    slow = "it evaluates the model once per layer and module"
    changes_weights = True  # each step runs with one module's weights replaced

    def key(self, job, merged: bool, p: dict) -> dict:
        """What one model's knockout is cached (and shipped, analysis.precomputed) under."""
        return {"weights": job.weights_id(merged), "limit": p["limit"], "eval": eval_key(job.eval_dir),
                "suites": list(knockout.SUITES)}

    def run(self, job, p):
        models = [("VLM", False)] + ([(f"merged ({_named(job.recipe)})", True)] if job.recipe else [])
        evaluate_fn = partial(evaluate, eval_dir=job.eval_dir, return_items=True, stop_at_answer=True)

        def one(i: int, label: str, merged: bool):
            def step(done, total, msg):  # one bar for all models, each step named by its model
                if job.progress:
                    job.progress(i * total + done, len(models) * total,
                                 f"model {i + 1} of {len(models)} ({label}): {msg}")

            def compute():
                with job.source.model(job, merged=merged) as (model, proc):
                    return knockout.knockout(model, proc, evaluate_fn, limit=p["limit"], device=job.device,
                                             progress=step)

            return job.cached(self.name, self.key(job, merged, p), compute)

        # One entry per model: the VLM's baseline is shared by every recipe's request. A cancel keeps
        # the layers finished so far (never cached), each model's entry saying what is missing.
        out, note = {}, None
        for i, (label, merged) in enumerate(models):
            try:
                out[label] = one(i, label, merged)
            except knockout.PartialKnockout as e:
                out[label] = e.result
                note = f"{label} has layers {e.result['layers'][0]}-{e.result['layers'][-1]} only"
                break
            except Cancelled:
                if not out:
                    raise
                note = f"{label} was not knocked out"
                break
        if note:
            for ko in out.values():
                ko["partial"] = f"cancelled: {note}"
        return out

    def summary(self, data, p):
        def acc(ko, s):
            lo, hi = ko.get("baseline_ci", {}).get(s, (None, None))
            return f"{s} {ko['baseline'][s]:.0%}" + ("" if lo is None else f" [{lo:.0%}, {hi:.0%}]")

        intact = "; ".join(f"{label} intact: " + ", ".join(acc(ko, s) for s in ko["baseline"])
                           for label, ko in data.items())
        partial = next((ko["partial"] for ko in data.values() if ko.get("partial")), None)
        head = f"**Partial, {partial}** (the finished layers are shown). " if partial else ""
        return (f"{head}{p['limit']} eval item(s) per suite, 95% intervals in brackets; text_math (no image) is the "
                f"control; {intact}")
