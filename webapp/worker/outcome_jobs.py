"""The measured outcome of what a walkthrough step just built: the original VLM and this tab's merge
(or DRIFT run) on the same small sample of the image suites, each accuracy with its 95% Wilson
interval and the paired difference with its bootstrap interval (worker side).

Each model's per-item outcomes are cached under its weights' id (merging.merge_identity.weights_id), the
dtype, the suites and the sample size, so a step clicked again, or the VLM scored for every step,
costs nothing the second time.
"""

from __future__ import annotations

from analysis.cache import cached
from analysis.evaluate import evaluate
from analysis.intervals import accuracy, paired_difference
from merging.errors import LabError
from merging.loading import serving_dtype
from webapp.presets import TOY_ROOT
from webapp.worker.evaluate_jobs import BATCH, sides

SUITES = ("perception", "visual_math")  # what a step is about: reading the image, and computing on it
ITEMS = 30  # per suite: about 40 s on one CPU core for both models; intervals about +-15 points
MAX_ITEMS = 300  # each suite's size


def _outcomes(ctx, model, wid: str, items: int, progress) -> dict[str, list[bool]]:
    """{suite: [correct per item]} of one model on the sample, cached by its weights."""
    key = {"weights": wid, "dtype": serving_dtype(ctx.device, ctx.models.cpu_dtype), "suites": list(SUITES),
           "limit": items}

    def compute():
        out = evaluate(model, suites=list(SUITES), limit=items, progress=progress, batch_size=BATCH,
                       eval_dir=TOY_ROOT / "eval", return_items=True, stop_at_answer=True)
        return {s: [bool(r["correct"]) for r in recs] for s, recs in out["items"].items()}

    return cached("walk-outcome", key, compute, ctx.cache_dir)


def run_outcome(ctx, args: dict) -> dict:
    """args: triple, recipe (a merge recipe or DriftRun), items per suite (default ITEMS).
    {"labels": {"original", "merged"}, "items": n, "suites": {suite: {"original", "merged": accuracy
    intervals, "diff": the merged minus the original, paired}}}."""
    items = int(args.get("items") or ITEMS)
    if not 1 <= items <= MAX_ITEMS:
        raise LabError(f"outcome: {items} items per suite is outside 1..{MAX_ITEMS}")
    progress = ctx.progress(yields=True)
    models = sides(ctx, args, progress)
    if len(models) < 2:
        raise LabError("outcome: nothing to compare (no merge or DRIFT run given)")
    labels, got = {}, {}
    for i, (name, label, get) in enumerate(models):
        model, wid = get()

        def part(done, total, msg, i=i, label=label):
            progress(i * total + done, len(models) * total, f"{label}: {msg}")

        got[name], labels[name] = _outcomes(ctx, model, wid, items, part), label
    suites = {s: {"original": accuracy(got["original"][s]), "merged": accuracy(got["merged"][s]),
                  "diff": paired_difference(got["original"][s], got["merged"][s])} for s in SUITES}
    return {"labels": labels, "items": items, "suites": suites}
