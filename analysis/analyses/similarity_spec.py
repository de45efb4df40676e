"""How aligned the two task vectors are: cosines and IP-Merging's subspace similarity."""

from __future__ import annotations

from analysis import chance_cosine, similarity
from analysis.analyses import Analysis, Figure, Knob, register


@register
class Similarity(Analysis):
    name = "similarity"
    title = "Similarity"
    about = ("How aligned the two task vectors are. Cosine near 0 everywhere means they are nearly "
             "orthogonal (FRANK Fig. 3): adding the reasoner's barely disturbs what the VLM learned. The grey "
             "band under the cosines is what two random task vectors of the same shape give 95% of the time "
             "(±1.96/√d): a cosine inside it is chance.")
    knobs = (Knob("rank", 32, "subspace rank", "top right-singular vectors compared (IP-Merging's k)", lo=1, hi=128),)
    figures = (Figure("similarity_figure", "similarity", "Similarity", "plot-similarity"),)
    needs_base = True

    def run(self, job, p):
        # Cached inside similarity.similarity, keyed on the three checkpoints' fingerprints.
        return similarity.similarity(*job.triple, rank=p["rank"], method="fast", device=job.device,
                                     progress=job.progress, cache_dir=job.cache_dir)

    def summary(self, data, p):
        cos = [abs(c) for c in data.get("block_cos", [])]
        band = chance_cosine.bands(data)
        chance = f" (random task vectors: within ±{max(band[1]):.4f})" if band else ""
        return f"largest |cosine| of a whole block: {max(cos):.3f}{chance}" if cos else ""
