"""`ip_merging` (IP-Merging, arXiv 2510.14387; no public code). Scope: one decoder layer at a time.

Per 2-D matrix of the layer (q, k, v, o, gate, up, down in LLaMA/Qwen blocks; every 2-D weight
of the block is treated alike so fused projections of other families work too):
  s = merging.linalg.subspace_similarity(tau_v, tau_r, rank)  (the number the heatmap shows);
  selected when s >= threshold; the others, and every 1-D tensor (norms, biases), keep W_v;
  lambda_n = sum S_v / sum S_r (nuclear-norm ratio);
  gamma = softmax(s / temperature) over the layer's selected matrices, times their count;
  W = W_v + lam * gamma * (lambda_n tau_r) @ V_k V_k^T, V_k the top-`rank` right singular vectors of tau_v.
All SVDs run in float32 whatever the storage dtype. `svd` picks the solver for every SVD of a
matrix pair: 1 exact (torch.linalg.svd; nuclear norms from the full spectra), 2 randomized
(torch.svd_lowrank; nuclear norms approximated by the top-`rank` singular values, the only
ones computed), 0 auto (linalg's rule: exact unless the matrix is large and rank small).
Tensors outside the decoder layers (final norm, embeddings) keep the VLM's: the method is
defined per decoder layer.
"""

from __future__ import annotations

import torch

from merging import linalg
from merging.methods import MergeMethod, Param, TensorSet, register

SVD_MODES = ("auto", "exact", "lowrank")


def nuclear_and_basis(tau_v: torch.Tensor, tau_r: torch.Tensor, rank: int, mode: str):
    """(sum S_v, sum S_r, V_k) with one solver for both matrices of the pair."""
    if linalg._use_lowrank(tau_v, rank, mode):
        _, s_v, v_k = linalg.top_svd(tau_v, rank, "lowrank")
        s_r = linalg.top_svd(tau_r, rank, "lowrank")[1]
    else:
        _, s_v, v_full = linalg.top_svd(tau_v, None, "exact")
        v_k = v_full[:, :rank]
        s_r = torch.linalg.svdvals(tau_r)
    return float(s_v.sum()), float(s_r.sum()), v_k


@register
class IPMerging(MergeMethod):
    name = "ip_merging"
    needs_base = True
    scope = "layer"
    description = ("Project the reasoner's rescaled task vector onto the VLM's top singular subspace, "
                   "only for matrices whose subspaces already agree.")
    params = (
        Param("threshold", 0.4, 0.0, 1.0, "merge a matrix only when its subspace similarity >= this "
              "(paper: 0.3-0.4 LLaVA, 0.6 Qwen)"),
        Param("rank", 32, 1, 8192, "top singular directions of the VLM's task vector kept", integer=True),
        Param("lam", 1.0, 0.0, 3.0, "scale of the projected update"),
        Param("temperature", 1.0, 0.01, 100.0, "softmax temperature of the per-matrix importance gamma"),
        Param("svd", 0, 0, 2, "SVD solver: 0 auto, 1 exact, 2 randomized", integer=True, per_layer=False),
    )

    def merge_layer(self, layer, sets: dict[str, TensorSet], p: dict, ctx) -> dict[str, torch.Tensor]:
        if layer is None:
            return {}
        rank, mode = int(p["rank"]), SVD_MODES[int(p["svd"])]
        scores: dict[str, float] = {}
        for name, t in sets.items():
            if t.vlm.dim() == 2:
                tau_v, tau_r = (t.vlm - t.base).float(), (t.reasoner - t.base).float()
                scores[name] = linalg.subspace_similarity(tau_v, tau_r, rank, mode)
        chosen = [n for n, s in scores.items() if s >= p["threshold"]]
        ctx.extra.setdefault("ip_merging", {})[layer] = {"scores": scores, "selected": chosen}
        if not chosen:
            return {}
        s_sel = torch.tensor([scores[n] for n in chosen], dtype=torch.float64)
        gamma = torch.softmax(s_sel / p["temperature"], dim=0) * len(chosen)
        out = {}
        for g, name in zip(gamma.tolist(), chosen):
            t = sets[name]
            tau_v, tau_r = (t.vlm - t.base).float(), (t.reasoner - t.base).float()
            nuc_v, nuc_r, v_k = nuclear_and_basis(tau_v, tau_r, rank, mode)
            lambda_n = nuc_v / nuc_r if nuc_r > 0 else 0.0
            dw = (tau_r @ v_k) @ v_k.T
            dw *= p["lam"] * g * lambda_n
            out[name] = t.vlm + dw.to(t.vlm.dtype)
        return out
