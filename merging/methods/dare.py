"""`dare_ties` and `dare_linear`: DARE sparsification (random drop, rescale) in generalized task
arithmetic (the recipe: gta.py). `rescale` picks how the survivors are rescaled: l1 (default,
mergekit's: each task vector keeps its L1 norm), inverse_density (the paper's 1/density), none. Seeded per tensor from the recipe seed and the canonical name
(MergeContext.generator)."""

from __future__ import annotations

from merging.methods import Paper, register
from merging.methods.gta import GeneralizedTaskArithmetic, gta_params

DARE = Paper("DARE", "Yu et al. 2024, Language Models are Super Mario (DARE)", "https://arxiv.org/abs/2311.03099")


@register
class DareTies(GeneralizedTaskArithmetic):
    name = "dare_ties"
    description = "DARE drop-and-rescale of each task vector, then TIES sign consensus."
    params = gta_params(alpha=1.0, normalize=False, dare=True)  # mergekit's default for dare_ties
    paper = DARE
    sparsify, consensus = "bernoulli", True


@register
class DareLinear(GeneralizedTaskArithmetic):
    name = "dare_linear"
    description = "DARE drop-and-rescale of each task vector, then a weighted sum."
    params = gta_params(alpha=0.5, normalize=False, dare=True)
    paper = DARE
    sparsify, consensus = "bernoulli", False

    def grid(self, num_layers: int) -> list[dict]:
        return [{"alpha": a, "density": 0.5} for a in (0.5, 1.0, 1.5)]
