"""`dare_ties` and `dare_linear`: DARE sparsification (random drop, rescale) in mergekit's
generalized task arithmetic (see ties.py for the full recipe). Seeded per tensor from the recipe
seed and the canonical name (MergeContext.generator)."""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, TensorSet, register
from merging.methods.ties import gta_merge, gta_params


@register
class DareTies(MergeMethod):
    name = "dare_ties"
    needs_base = True
    scope = "tensor"
    description = "DARE drop-and-rescale of each task vector, then TIES sign consensus."
    params = gta_params(alpha=1.0, normalize=0)  # mergekit's default for dare_ties

    def merge_tensor(self, t: TensorSet, p: dict, ctx) -> torch.Tensor:
        return gta_merge(t, p, ctx, "bernoulli", consensus=True)


@register
class DareLinear(MergeMethod):
    name = "dare_linear"
    needs_base = True
    scope = "tensor"
    description = "DARE drop-and-rescale of each task vector, then a weighted sum."
    params = gta_params(alpha=0.5, normalize=0)

    def merge_tensor(self, t: TensorSet, p: dict, ctx) -> torch.Tensor:
        return gta_merge(t, p, ctx, "bernoulli", consensus=False)
