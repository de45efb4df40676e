"""Where the recipe's merge changed the VLM: relative change per layer and module."""

from __future__ import annotations

from analysis import changes
from analysis.analyses import Analysis, Figure, register


@register
class Changes(Analysis):
    name = "changes"
    title = "Change map"
    about = "Where this tab's merge changed the model: ‖W_merged − W_vlm‖ / ‖W_vlm‖ per layer and module."
    figures = (Figure("changes_figure", "changes", "Change map", "plot-changes"),)
    on_merge = needs_merge = True

    def run(self, job, p):
        def compute():
            with job.source.weights(job, merged=True) as merged:
                return changes.change_map(merged, job.triple[0], progress=job.progress)

        return job.cached(self.name, {"weights": job.weights_id(merged=True)}, compute)

    def summary(self, data, p):
        return (f"largest relative norm change ||W - W_v|| / ||W_v|| of one weight matrix: "
                f"{data.get('max', 0) * 100:.2f}% (a norm ratio, not a share of weights changed)")
