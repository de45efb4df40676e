"""Singular values of the two task vectors per layer and module, and their nuclear-norm ratio."""

from __future__ import annotations

from analysis import spectra
from analysis.analyses import Analysis, Figure, Knob, register


@register
class Spectra(Analysis):
    name = "spectra"
    title = "Singular values"
    about = ("Singular values of the two task vectors (VLM − base and reasoner − base) per layer and module. "
             "IP-Merging's observation: the reasoner's are larger, so its update is rescaled before merging.")
    # k 32: ip_merging's default rank, so the spectra reuse the decompositions a merge filed.
    knobs = (Knob("k", 32, "singular values per matrix (k)", lo=4, hi=128),)
    figures = (Figure("spectra_figure", "spectra", "Singular values", "plot-spectra"),
               Figure("ratio_figure", "nuclear_ratio", "nuclear-norm ratio", "plot-spectra-ratio"))
    needs_base = True

    def run(self, job, p):
        # Cached inside spectra.spectra, keyed on the three checkpoints' fingerprints.
        return spectra.spectra(*job.triple, k=p["k"], method="fast", device=job.device, progress=job.progress,
                               cache_dir=job.cache_dir)

    def summary(self, data, p):
        return f"top-{p['k']} singular values of both task vectors, {data['num_layers']} layers"
