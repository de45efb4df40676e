"""`layer_swap` (Bring Reason to Vision): early decoder layers keep the VLM, later ones are `linear`.

Layers <= base_layer_num keep W_v; later layers, and tensors outside the decoder layers (the
final norm counts as after the last layer), get (1 - alpha) W_v + alpha W_r. [choice] alpha
defaults to 1, a true swap (at 0.1 the default changed no answer on the bundled family).
base_layer_num = -1 means what it means in the BR2V reference code: no layer is kept, every
layer is `linear` (with alpha 1, the reasoner's language model). [choice] -2, the default, means
"the first half": layers < num_layers // 2 keep the VLM's, so the default does something
sensible on any depth.
"""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Param, TensorSet, register
from merging.methods.linear import BR2V

FIRST_HALF = -2  # base_layer_num's default: the first half of the layers keeps the VLM's


@register
class LayerSwap(MergeMethod):
    name = "layer_swap"
    needs_base = False
    scope = "tensor"
    description = "Keep the VLM's early (perception) layers; average the later (reasoning) layers."
    params = (
        Param("alpha", 1.0, 0.0, 1.0, "weight on the reasoner in the later layers (default 1: they are "
                                            "swapped for the reasoner's)"),
        Param("base_layer_num", FIRST_HALF, FIRST_HALF, 10_000, "last layer kept from the VLM; -1 = none "
              "(as in the BR2V code); -2 = the first half", kind=int, per_layer=False, layer_index=True),
    )
    paper = BR2V

    def grid(self, num_layers: int) -> list[dict]:
        # the VLM kept up to a quarter, half and three quarters of the depth
        half, quarter = num_layers // 2, max(1, num_layers // 4)
        return [{"alpha": a, "base_layer_num": n} for a in (0.5, 1.0)
                for n in sorted({quarter - 1, half - 1, num_layers - quarter - 1})]

    def kept(self, layer: int | None, p: dict, num_layers: int) -> bool:
        last = p["base_layer_num"]
        if last == FIRST_HALF:
            last = num_layers // 2 - 1
        return layer is not None and layer <= last  # -1: no layer is <= -1, none kept

    def merge_tensor(self, t: TensorSet, p: dict, ctx) -> torch.Tensor:
        if self.kept(t.layer, p, ctx.num_layers):
            return t.vlm
        a = p["alpha"]
        out = t.vlm * (1 - a)
        return out.add_(t.reasoner * a)
