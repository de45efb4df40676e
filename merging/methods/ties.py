"""`ties` and the generalized task arithmetic shared with DARE (mergekit's documented semantics).

Models: the VLM-LM (weight `weight_vlm`) and the reasoner (weight `alpha`) over the base.
1. task vectors tau_i = W_i - W_0, each sparsified with `density`
   (ties: keep the top int(density * numel) entries by |value|, no rescale;
    dare: Bernoulli keep-mask with p = density, survivors divided by density);
2. weighted deltas d_i = w_i tau_i;
3. consensus (ties, dare_ties): sign = +1 where sum_i d_i >= 0 else -1; m_i = (sign(d_i) == sign);
   merged = sum_i d_i m_i, normalize divides by sum_i w_i m_i;
   no consensus (dare_linear): merged = sum_i d_i, normalize divides by sum_i w_i;
   a divisor with |.| < 1e-8 is set to 1 (entries no model kept stay 0);
4. W = W_0 + lambda * merged.
"""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Param, TensorSet, register


def gta_params(alpha: float, normalize: int) -> tuple[Param, ...]:
    return (
        Param("alpha", alpha, 0.0, 2.0, "weight of the reasoner's task vector"),
        Param("weight_vlm", 1.0, 0.0, 2.0, "weight of the VLM's own task vector"),
        Param("density", 0.5, 0.01, 1.0, "fraction of each task vector kept"),
        Param("lambda", 1.0, 0.0, 3.0, "scale of the merged task vector"),
        Param("normalize", normalize, 0, 1, "1: divide by the summed weights (of agreeing models)",
              integer=True, per_layer=False),
    )


def magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top int(density * numel) entries by magnitude (mergekit `magnitude`, no rescale).

    mergekit refuses k == 0; here a tiny tensor (e.g. a 1-D norm at low density) just keeps nothing.
    """
    if density >= 1:
        return tau
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    idx = torch.topk(tau.abs().flatten().float(), k, sorted=False).indices
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[idx] = True
    return tau * mask.view(tau.shape)


def bernoulli(tau: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability density, rescale survivors by 1/density.

    The mask is drawn on the CPU from a per-tensor generator so streamed, in-place, CPU and GPU
    merges of the same recipe give the same tensors.
    """
    if density >= 1:
        return tau
    keep = torch.rand(tau.shape, generator=gen, device="cpu") < density
    return (tau * keep.to(tau.device)) / density


def gta_merge(t: TensorSet, p: dict, ctx, sparsify: str, consensus: bool) -> torch.Tensor:
    weights = (float(p["weight_vlm"]), float(p["alpha"]))
    taus = [t.vlm - t.base, t.reasoner - t.base]
    if sparsify == "magnitude":
        taus = [magnitude(x, p["density"]) for x in taus]
    else:
        gen = ctx.generator(t.name, device="cpu")  # one stream per tensor: VLM's mask, then reasoner's
        taus = [bernoulli(x, p["density"], gen) for x in taus]
    deltas = [w * x for w, x in zip(weights, taus)]
    del taus
    if consensus:
        total = deltas[0] + deltas[1]
        sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
        del total
        masks = [torch.sign(d) == sign for d in deltas]
        merged = deltas[0] * masks[0] + deltas[1] * masks[1]
        divisor = weights[0] * masks[0].to(merged.dtype) + weights[1] * masks[1].to(merged.dtype)
    else:
        merged = deltas[0] + deltas[1]
        divisor = torch.full_like(merged, weights[0] + weights[1])
    if p["normalize"] >= 0.5:
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        merged = merged / divisor
    return t.base + merged * p["lambda"]


@register
class Ties(MergeMethod):
    name = "ties"
    needs_base = True
    scope = "tensor"
    description = "TIES: trim task vectors by magnitude, elect signs, average the agreeing entries."
    params = gta_params(alpha=1.0, normalize=1)

    def merge_tensor(self, t: TensorSet, p: dict, ctx) -> torch.Tensor:
        return gta_merge(t, p, ctx, "magnitude", consensus=True)
