"""The worker's analysis job: analysis.runner on the loaded model, figures back as JSON.

The analyses, their defaults and their cache keys are analysis.analyses', the same as the CLI
report's, so a result computed by either is served to the other; a result shipped with the bundled
family (analysis.precomputed) is served when its key is the one asked, unless args["live"]. The live
model is handed to an analysis only after the merger is checked to hold the weights the cache key
names (merging.merge_identity.weights_id), so a result is never stored under weights it was not computed on.
"""

from __future__ import annotations

from contextlib import contextmanager

from analysis import analyses, precomputed, runner
from merging.errors import LabError
from merging.loading import eager_attention
from merging.recipe import from_dict
from webapp.presets import TOY_ROOT
from webapp.protocol import triple_of
from webapp.safety import check_images


class LoadedSource:
    """The worker's loaded model, put into the state an analysis asks for."""

    def __init__(self, ctx, recipe: dict | None):
        self.ctx, self.recipe = ctx, recipe

    def _held(self, job, merged: bool):
        recipe = self.recipe if merged else None
        loaded = self.ctx.models.get(job.triple, job.progress)
        if loaded.hold(recipe, progress=job.progress) != job.weights_id(merged):
            raise LabError("internal: the loaded weights differ from the ones this analysis is cached under")
        return loaded

    @contextmanager
    def weights(self, job, merged: bool):
        yield self._held(job, merged).model

    @contextmanager
    def model(self, job, merged: bool, attentions: bool = False):
        loaded = self._held(job, merged)
        if not attentions:
            yield loaded.model, loaded.processor
            return
        with eager_attention(loaded.model):
            yield loaded.model, loaded.processor


def _job(ctx, args: dict, progress) -> runner.Job:
    a = analyses.get(args["name"])
    recipe = args.get("recipe") if a.on_merge else None
    t = args["triple"]
    # An analysis of the merge runs on the merge's own triple.
    triple = triple_of(recipe) if recipe else (t["vlm"], t["reasoner"], t["base"])
    return runner.Job(tuple(triple), from_dict(recipe) if recipe else None, LoadedSource(ctx, recipe),
                      device=ctx.device, cache_dir=ctx.cache_dir, progress=progress,
                      samples_dir=TOY_ROOT / "samples", eval_dir=TOY_ROOT / "eval",
                      precomputed=not args.get("live"))  # "live": the user asked to recompute


def run_analysis(ctx, args: dict) -> dict:
    name = args["name"]
    a = analyses.get(name)
    if args.get("images"):
        check_images(args["images"])
    progress = ctx.progress(yields=not a.changes_weights)
    job = _job(ctx, args, progress)
    data, p = runner.run(name, job, args)
    out = {"figures": [f.to_json() for f in runner.figures_of(name, data).values()],
           "summary": a.summary(data, p), "precomputed": [precomputed.mark(e) for e in job.served]}
    if name == "attention":
        out["beta"] = data["beta"]  # the merge tab offers it for frank's prior
    return out
