"""`ip_merging` (IP-Merging, arXiv 2510.14387; no public code). Scope: one decoder layer at a time.

Per 2-D matrix of the layer (q, k, v, o, gate, up, down in LLaMA/Qwen blocks; every 2-D weight
of the block is treated alike so fused projections of other families work too):
  s = merging.linalg.similarity of the top-`rank` decompositions of tau_v and tau_r
      (`similarity` 0: the paper's index-paired score; 1 [choice]: principal angles);
  selected: [choice, the default] with `top_fraction` > 0 (default 0.5) the ceil(fraction * n)
  matrices of the layer with the highest s; with top_fraction 0 the paper's rule s >= threshold
  (its scale depends on rank and matrix shape: on the bundled family no score reaches 0.4);
  the others, and every 1-D tensor, keep W_v;
  lambda_n = ||tau_v||_* / ||tau_r||_* (exact nuclear norms, whatever the solver);
  gamma = softmax(s / temperature) over the layer's selected matrices, times their count;
  W = W_v + lam * gamma * (lambda_n tau_r) @ V_k V_k^T, V_k the top-`rank` right singular vectors of tau_v.
Each task vector is decomposed once, the layer's matrices in one batched call, and the result is
kept in merging.decomposition_cache (the spectra and similarity analyses read the same entries);
`svd` picks the solver of the top-k basis: 1 exact (Gram eigen-decomposition in float64), 2 randomized (torch.svd_lowrank),
0 auto (exact unless the matrix is large and rank small). Tensors outside the decoder layers
(final norm, embeddings) keep the VLM's: the method is defined per decoder layer.
"""

from __future__ import annotations

import math
import statistics

import torch

from merging import decomposition_cache, linalg
from merging.methods import MergeMethod, Paper, Param, TensorSet, register

SVD_MODES = ("auto", "exact", "lowrank")


def select(scores: dict[str, float], threshold: float, top_fraction: float) -> list[str]:
    """The matrices merged: score >= threshold, or the top fraction of the layer by score."""
    if top_fraction > 0:
        n = math.ceil(top_fraction * len(scores) - 1e-9)
        return sorted(scores, key=lambda name: -scores[name])[:n]
    return [n for n, s in scores.items() if s >= threshold]


def decompositions(sets: list[TensorSet], rank: int, mode: str, fingerprints: dict | None = None) -> list:
    """[dv_0, dr_0, dv_1, dr_1, ...] of the task vectors of these matrices: one batched call,
    served from / filed in the decomposition cache (shared with the spectra and similarity
    analyses). With the triple's fingerprints ({"vlm", "reasoner", "base"}) the entries are also
    filed under them, so a later analysis finds them without reading the checkpoints."""
    reqs = []
    for t in sets:
        for role, w in (("vlm", t.vlm), ("reasoner", t.reasoner)):
            alias = (decomposition_cache.alias_key(fingerprints[role], fingerprints["base"], t.name, w.dtype)
                     if fingerprints else None)
            reqs.append(decomposition_cache.Request((w - t.base).float(), alias=alias))
    return decomposition_cache.decompose_cached(reqs, rank, mode)


@register
class IPMerging(MergeMethod):
    name = "ip_merging"
    needs_base = True
    scope = "layer"
    description = ("Project the reasoner's rescaled task vector onto the VLM's top singular subspace, "
                   "only for matrices whose subspaces already agree.")
    params = (
        Param("threshold", 0.4, 0.0, 1.0, "used when top_fraction is 0: merge a matrix only when its subspace "
              "similarity >= this (paper: 0.3-0.4 LLaVA, 0.6 Qwen; the score's scale depends on rank and shape)"),
        Param("top_fraction", 0.5, 0.0, 1.0, "merge this fraction of each layer's matrices, the most similar "
              "first (default 0.5 [choice]: calibration-free, selects on any triple; 0 = the paper's threshold)",
              per_layer=False),
        Param("rank", 32, 1, 8192, "top singular directions of the VLM's task vector kept", kind=int),
        Param("lam", 1.0, 0.0, 3.0, "scale of the projected update"),
        Param("temperature", 1.0, 0.01, 100.0, "softmax temperature of the per-matrix importance gamma"),
        Param("svd", 0, 0, 2, "SVD solver of the top-k basis: 0 auto, 1 exact, 2 randomized", kind=int,
              per_layer=False),
        Param("similarity", 0, 0, 1, "0: paper's paired singular vectors; 1: principal angles "
              "(rotation-invariant)", kind=int, per_layer=False),
    )
    paper = Paper("IP-Merging", "IP-Merging, 2025", "https://arxiv.org/abs/2510.14387")

    def grid(self, num_layers: int) -> list[dict]:
        return [{"top_fraction": f, "lam": lam} for f in (0.3, 0.6, 1.0) for lam in (1.0, 2.0)]

    def merge_layer(self, layer, sets: dict[str, TensorSet], p: dict, ctx) -> dict[str, torch.Tensor]:
        if layer is None:
            return {}
        rank, mode = p["rank"], SVD_MODES[p["svd"]]
        kind = linalg.SIMILARITIES[p["similarity"]]
        names = [name for name, t in sets.items() if t.vlm.dim() == 2]
        decs = decompositions([sets[n] for n in names], rank, mode, ctx.extra.get("fingerprints"))
        scores: dict[str, float] = {}
        parts: dict[str, tuple] = {}
        for name, dv, dr in zip(names, decs[0::2], decs[1::2]):
            scores[name] = linalg.similarity(dv, dr, kind)
            parts[name] = (dv, dr.nuclear)
        chosen = select(scores, p["threshold"], p["top_fraction"])
        ctx.extra.setdefault(self.name, {})[layer] = {"scores": scores, "selected": chosen,
                                                      "threshold": p["threshold"]}
        if not chosen:
            return {}
        s_sel = torch.tensor([scores[n] for n in chosen], dtype=torch.float64)
        gamma = torch.softmax(s_sel / p["temperature"], dim=0) * len(chosen)
        out = {}
        for g, name in zip(gamma.tolist(), chosen):
            t = sets[name]
            dv, nuc_r = parts[name]
            tau_r = (t.reasoner - t.base).float()
            lambda_n = dv.nuclear / nuc_r if nuc_r > 0 else 0.0
            v_k = dv.v.to(tau_r.device)
            dw = (tau_r @ v_k) @ v_k.T
            dw *= p["lam"] * g * lambda_n
            out[name] = t.vlm + dw.to(t.vlm.dtype)
        return out

    # ---- diagnostics: ctx.extra[name] is {layer: {"scores", "selected", "threshold"}}
    def summarize_diagnostics(self, extra: dict) -> tuple[dict, list[str]]:
        if self.name not in extra:
            return {}, []
        d = extra[self.name]
        scores = [s for x in d.values() for s in x["scores"].values()]
        selected = {str(k): x["selected"] for k, x in d.items()}
        thr = next(iter(d.values()))["threshold"] if d else None
        out = {"threshold": thr, "selected_per_layer": {k: len(v) for k, v in selected.items()},
               "selected": sum(len(v) for v in selected.values()), "matrices": len(scores)}
        if scores:
            q = statistics.quantiles(scores, n=4) if len(scores) > 1 else [scores[0]] * 3
            out["scores"] = {"min": min(scores), "q1": q[0], "median": q[1], "q3": q[2], "max": max(scores)}
        warn = []
        if scores and out["selected"] == 0:
            warn.append(f"{self.name} selected no matrix: highest similarity {max(scores):.2f} < threshold "
                        f"{thr:.2f}; lower 'threshold' or set 'top_fraction'")
        return {self.name: out}, warn

    def selection_details(self, extra: dict) -> str:
        if self.name not in extra:
            return ""
        d = extra[self.name].values()
        sel, tot = sum(len(x["selected"]) for x in d), sum(len(x["scores"]) for x in d)
        scores = [s for x in d for s in x["scores"].values()]
        top = max(scores) if scores else float("nan")
        return f"{sel}/{tot} matrices merged (max similarity {top:.2f})"

    def report_lines(self, diagnostics: dict) -> list[str]:
        ip = diagnostics.get(self.name)
        if not ip or "scores" not in ip:
            return []
        s = ip["scores"]
        return [f"{self.name} merged {ip['selected']} of {ip['matrices']} matrices; similarity min {s['min']:.2f}"
                f" / median {s['median']:.2f} / max {s['max']:.2f} vs threshold {ip['threshold']:.2f}"]

    def layer_note(self, diagnostics: dict, layer: str) -> str:
        per_layer = diagnostics.get(self.name, {}).get("selected_per_layer", {})
        return f"; {self.name} merged {per_layer[layer]} matrices" if layer in per_layer else ""
