"""The worker's evaluate job: this tab's merge (or DRIFT result) and a second model (the original VLM, or
another merge or DRIFT run the tab kept: webapp.worker.panes) scored on the bundled suites or on an
uploaded eval set, with the model the worker already holds (worker side).

The original is scored with the merger restored (Loaded.hold(None)), a merge with it applied, so
both are the same weights chat answers with. Scores of the bundled suites are cached under the
weights' id (merging.merge_identity.weights_id), the dtype and the number of items; an uploaded set is
scored every time. Each item's outcome goes back too ("correct": "0110..." per model and suite), so
the panel can give every accuracy its interval and the difference its paired interval.
"""

from __future__ import annotations

from analysis.cache import cached
from analysis.eval_file import read_items
from analysis.evaluate import SUITES, evaluate
from merging.errors import LabError
from merging.loading import serving_dtype
from tasks.toydata import parse_answer
from webapp.presets import TOY_ROOT
from webapp.protocol import EVAL_MAX_LIMIT
from webapp.worker.panes import check_compare, label_of, request_triple, weights_of

MAX_LIMIT = EVAL_MAX_LIMIT
MAX_SHOWN = 200  # disagreements sent back
BATCH = 16  # items per generate call: a cancel waits for at most one batch


def sides(ctx, args: dict, progress) -> list[tuple]:
    """(name, label, getter of ((model, processor), weights id)) of the models to score: "original" (the
    second side: args["compare"], None for the original VLM) first, then "merged" (this tab's merge or
    DRIFT run) when there is one."""
    other = check_compare(args)
    loaded = ctx.models.get(request_triple(args), progress)

    def getter(variant):
        return lambda: weights_of(ctx, loaded, variant, progress)

    out = [("original", label_of(other), getter(other))]
    if args.get("recipe"):
        out.append(("merged", label_of(args["recipe"]), getter(args["recipe"])))
    return out


def _suite_args(args: dict) -> tuple[list[str], int]:
    suites = [s for s in args.get("suites") or SUITES if s in SUITES]
    if not suites:
        raise LabError("choose at least one suite")
    limit = int(args.get("limit") or 20)
    if not 1 <= limit <= MAX_LIMIT:
        raise LabError(f"items per suite: {limit} is outside 1..{MAX_LIMIT}")
    return suites, limit


def _outcomes(out: dict) -> dict:
    """{suite: "0110..."}: each item's outcome of an evaluate(..., return_items=True) result."""
    return {s: "".join("1" if r["correct"] else "0" for r in recs) for s, recs in out["items"].items()}


def _scorer(ctx, args: dict, items: list[dict] | None):
    """score(model, wid, progress) -> (accuracy by suite, outcomes by suite, records of the custom set or None)."""
    if items is not None:
        def score_file(model, wid, progress):
            out = evaluate(model, suites=[], extra={"custom": items}, progress=progress, batch_size=BATCH,
                           return_items=True)
            return out["accuracy"], _outcomes(out), out["items"]["custom"]
        return score_file
    suites, limit = _suite_args(args)
    dtype = serving_dtype(ctx.device, ctx.models.cpu_dtype)

    def score_suites(model, wid, progress):
        def compute():
            out = evaluate(model, suites=suites, limit=limit, progress=progress, batch_size=BATCH,
                           eval_dir=TOY_ROOT / "eval", return_items=True)
            return {"accuracy": out["accuracy"], "correct": _outcomes(out)}

        key = {"weights": wid, "dtype": dtype, "suites": suites, "limit": limit}
        got = cached("evaluate_items", key, compute, ctx.cache_dir)
        return got["accuracy"], got["correct"], None
    return score_suites


def disagreements(items: list[dict], original: list[dict], merged: list[dict]) -> list[dict]:
    """The items whose final answers differ between the two models, with both outputs."""
    out = []
    for it, a, b in zip(items, original, merged):
        pa, pb = parse_answer(a["output"]), parse_answer(b["output"])
        if pa != pb:
            out.append({"line": it["line"], "id": it["id"], "question": it["question"], "answer": it["answer"],
                        "image": str(it["image_path"]) if it["image_path"] else None,
                        "original": pa or a["output"].strip()[:80], "original_correct": a["correct"],
                        "merged": pb or b["output"].strip()[:80], "merged_correct": b["correct"]})
    return out


def run_evaluate(ctx, args: dict) -> dict:
    """{"labels", "accuracy": {"original": {...}, "merged": {...}}, "correct" (same shape: "0110..." per
    suite), "items", "disagree" (an uploaded set)}."""
    progress = ctx.progress(yields=True)
    items = None
    if args.get("suite_file"):  # checked by the UI (inside its upload folder); read again here, whole
        items = read_items(args["suite_file"], by_name=bool(args.get("by_name")), name=args.get("name"))
    score = _scorer(ctx, args, items)
    models = sides(ctx, args, progress)
    labels, accuracy, correct, records = {}, {}, {}, {}
    for i, (name, label, get) in enumerate(models):
        model, wid = get()

        def part(done, total, msg, i=i, label=label):
            progress(i * total + done, len(models) * total, f"{label}: {msg}")

        accuracy[name], correct[name], records[name] = score(model, wid, part)
        labels[name] = label
    out = {"labels": labels, "accuracy": accuracy, "correct": correct,
           "items": len(items) if items is not None else None}
    if items is not None and "merged" in records:
        found = disagreements(items, records["original"], records["merged"])
        out.update(disagree=found[:MAX_SHOWN], disagree_total=len(found))
    return out
