"""`task_arithmetic`: W = W_v + alpha (W_r - W_0), the reasoner's task vector added to the VLM.

Equals mergekit task_arithmetic with the VLM-LM at weight 1, the reasoner at weight alpha,
normalize false.
"""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Paper, Param, TensorSet, mergekit_value, register


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    needs_base = True
    scope = "tensor"
    elementwise = True
    default = True  # the app opens with it: one knob, and alpha 1 is the whole fine-tune
    description = "Add alpha times the reasoner's task vector (reasoner - base) to the VLM."
    params = (Param("alpha", 1.0, 0.0, 2.0, "scale of the reasoner's task vector added to the VLM "
                             "(default 1, mergekit's weight: the whole fine-tune; lower it if perception drops)"),)
    paper = Paper("task arithmetic", "Ilharco et al. 2023, Editing Models with Task Arithmetic",
                  "https://arxiv.org/abs/2212.04089")

    def grid(self, num_layers: int) -> list[dict]:
        return [{"alpha": a} for a in (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)]

    def merge_tensor(self, t: TensorSet, p: dict, ctx) -> torch.Tensor:
        # In place on our own temporary only (inputs may be the in-place merger's originals):
        # one temporary instead of three keeps the streaming peak low.
        out = t.reasoner - t.base
        out.mul_(p["alpha"])
        return out.add_(t.vlm)

    def to_mergekit(self, recipe, knobs: dict) -> dict | None:
        return {"merge_method": "task_arithmetic", "base_model": recipe.base,
                "models": [{"model": recipe.vlm, "parameters": {"weight": 1.0}},
                           {"model": recipe.reasoner, "parameters": {"weight": mergekit_value(knobs["alpha"])}}],
                "parameters": {"normalize": False}}
