"""The worker's handout job: analysis.handout on the loaded model (analyses and scores cached as the
panels' are), the page back as HTML text; the UI process writes it to a file the browser downloads."""

from __future__ import annotations

from analysis import handout, runner
from merging.errors import LabError
from merging.recipe import from_dict
from webapp.presets import TOY_ROOT
from webapp.protocol import triple_of
from webapp.worker.analysis_jobs import LoadedSource

MAX_LIMIT = 100  # items per suite: a handout is a quick record, the Evaluate tab is for larger runs


def run_handout(ctx, args: dict) -> dict:
    recipe = args.get("recipe")
    if not recipe:
        raise LabError("merge first: a handout describes a merge")
    limit = int(args.get("limit") or handout.DEFAULT_LIMIT)
    if not 1 <= limit <= MAX_LIMIT:
        raise LabError(f"items per suite: enter a whole number from 1 to {MAX_LIMIT}")
    progress = ctx.progress(yields=True)
    job = runner.Job(tuple(triple_of(recipe)), from_dict(recipe), LoadedSource(ctx, recipe), device=ctx.device,
                     cache_dir=ctx.cache_dir, progress=progress, samples_dir=TOY_ROOT / "samples",
                     eval_dir=TOY_ROOT / "eval")
    parts = handout.analyses_of(job)
    scores = handout.scores(job, limit, progress)
    page = handout.render(args.get("shown_recipe") or recipe, scores, parts, args.get("lesson") or [])
    return {"html": page, "scores": scores}
