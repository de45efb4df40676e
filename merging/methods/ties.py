"""`ties`: magnitude trimming and sign consensus in generalized task arithmetic (the recipe and
the BR2V variant: gta.py)."""

from __future__ import annotations

from merging.methods import Paper, register
from merging.methods.gta import GeneralizedTaskArithmetic, gta_params


@register
class Ties(GeneralizedTaskArithmetic):
    name = "ties"
    description = "TIES: trim task vectors by magnitude, elect signs, average the agreeing entries."
    params = gta_params(alpha=1.0, normalize=True)
    paper = Paper("TIES", "Yadav et al. 2023, TIES-Merging", "https://arxiv.org/abs/2306.01708")
    sparsify, consensus = "magnitude", True
