"""`linear` (Bring Reason to Vision): W = (1 - alpha) W_v + alpha W_r. No base model needed."""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Paper, Param, TensorSet, mergekit_value, register

BR2V = Paper("BR2V", "Chen et al. 2025, Bring Reason to Vision (ICML)", "https://arxiv.org/abs/2505.05464")


@register
class Linear(MergeMethod):
    name = "linear"
    needs_base = False
    scope = "tensor"
    elementwise = True
    description = "Weighted average of the VLM's LM and the reasoner (BR2V); the paper uses alpha 0.1."
    params = (Param("alpha", 0.1, 0.0, 1.0, "weight on the reasoner; the paper uses 0.1 (tuned over 0.1-0.2)"),)
    paper = BR2V

    def grid(self, num_layers: int) -> list[dict]:
        return [{"alpha": a} for a in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)]

    def merge_tensor(self, t: TensorSet, p: dict, ctx) -> torch.Tensor:
        a = p["alpha"]
        out = t.vlm * (1 - a)  # a fresh tensor: the inputs are never modified
        return out.add_(t.reasoner * a)

    def to_mergekit(self, recipe, knobs: dict) -> dict | None:
        alpha = mergekit_value(knobs["alpha"])
        other = [1.0 - a for a in alpha] if isinstance(alpha, list) else 1.0 - alpha
        return {"merge_method": "linear",
                "models": [{"model": recipe.vlm, "parameters": {"weight": other}},
                           {"model": recipe.reasoner, "parameters": {"weight": alpha}}]}
