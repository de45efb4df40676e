"""`ip_merging` (IP-Merging, arXiv 2510.14387; no public code). Scope: one decoder layer at a time.

Per 2-D matrix of the layer (q, k, v, o, gate, up, down in LLaMA/Qwen blocks; every 2-D weight
of the block is treated alike so fused projections of other families work too):
  s = merging.linalg.similarity of the top-`rank` decompositions of tau_v and tau_r
      (`similarity` 0: the paper's index-paired score; 1 [choice]: principal angles);
  selected, by one of two rules that `use_threshold` names: 0 [choice, the default] the
  ceil(top_fraction * n) matrices of the layer with the highest s; 1 the paper's s >= threshold
  (its scale depends on rank and matrix shape: on the bundled family no score reaches 0.4).
  `top_fraction: 0` is the older spelling of use_threshold: 1. A knob the recipe sets for the
  rule it does not use is refused, never ignored (validate);
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

from merging import chance_similarity, decomposition_cache, linalg
from merging.errors import LabError
from merging.methods import MergeMethod, Paper, Param, TensorSet, Toggle, register

SVD_MODES = ("auto", "exact", "lowrank")
# [choice] The report warns when the median matrix scores less than this many times what unrelated
# directions score (merging.chance_similarity): the selection then ranks matrices on near-noise.
NEAR_CHANCE = 3.0


def by_threshold(p: dict) -> bool:
    """The paper's rule (score >= threshold) rather than the top fraction: use_threshold on, or the
    older spelling top_fraction 0."""
    return bool(p.get("use_threshold", 0)) or ("top_fraction" in p and float(p["top_fraction"]) <= 0)


def select(scores: dict[str, float], threshold: float, top_fraction: float) -> list[str]:
    """The matrices merged: score >= threshold (top_fraction 0), or the top fraction of the layer by score."""
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
        Param("threshold", 0.4, 0.0, 1.0, "with use_threshold 1: merge a matrix only when its subspace "
              "similarity >= this (paper: 0.3-0.4 LLaVA, 0.6 Qwen; the score's scale depends on rank and shape)"),
        Param("top_fraction", 0.5, 0.0, 1.0, "with use_threshold 0: merge this fraction of each layer's "
              "matrices, the most similar first (default 0.5 [choice]: calibration-free, selects on any triple)",
              per_layer=False),
        Param("use_threshold", 0, 0, 1, "1: the paper's rule, merge the matrices whose similarity reaches "
              "'threshold'; 0: each layer's 'top_fraction'", kind=bool, per_layer=False),
        Param("rank", 32, 1, 8192, "top singular directions of the VLM's task vector kept", kind=int),
        Param("lam", 1.0, 0.0, 3.0, "scale of the projected update"),
        Param("temperature", 1.0, 0.01, 100.0, "softmax temperature of the per-matrix importance gamma"),
        Param("svd", 0, 0, 2, "SVD solver of the top-k basis: 0 auto, 1 exact, 2 randomized", kind=int,
              per_layer=False),
        Param("similarity", 0, 0, 1, "0: paper's paired singular vectors; 1: principal angles "
              "(rotation-invariant)", kind=int, per_layer=False),
    )
    paper = Paper("IP-Merging", "IP-Merging, 2025", "https://arxiv.org/abs/2510.14387")
    # The selection rule is the app's checkbox: each rule hides the other's knob, so neither is sent unused.
    toggle = Toggle("use_threshold", "Select by the paper's similarity threshold",
                    "IP-Merging: merge the matrices whose similarity reaches the threshold, instead of the "
                    "most similar fraction of each layer", hides_when_on=("top_fraction",),
                    hides_when_off=("threshold",))

    def grid(self, num_layers: int) -> list[dict]:
        return [{"top_fraction": f, "lam": lam} for f in (0.3, 0.6, 1.0) for lam in (1.0, 2.0)]

    def validate(self, params: dict) -> None:
        # A knob of the rule not in use would be ignored: refuse it instead.
        if "threshold" in params and not by_threshold(params):
            raise LabError(f"{self.name}: 'threshold' applies only with use_threshold: 1 (the paper's rule); "
                           "the default rule merges each layer's top_fraction, so add use_threshold: 1 or drop "
                           "'threshold'")
        if params.get("use_threshold", 0) and float(params.get("top_fraction", 0)) > 0:
            raise LabError(f"{self.name}: 'top_fraction' means nothing with use_threshold: 1 (matrices are "
                           "selected by 'threshold'); drop one of the two")

    def merge_layer(self, layer, sets: dict[str, TensorSet], p: dict, ctx) -> dict[str, torch.Tensor]:
        if layer is None:
            return {}
        rank, mode = p["rank"], SVD_MODES[p["svd"]]
        kind = linalg.SIMILARITIES[p["similarity"]]
        names = [name for name, t in sets.items() if t.vlm.dim() == 2]
        decs = decompositions([sets[n] for n in names], rank, mode, ctx.fingerprints)
        scores: dict[str, float] = {}
        chance: dict[str, float] = {}
        parts: dict[str, tuple] = {}
        for name, dv, dr in zip(names, decs[0::2], decs[1::2]):
            scores[name] = linalg.similarity(dv, dr, kind)
            chance[name] = chance_similarity.chance(dv.v.shape[0], min(dv.v.shape[1], dr.v.shape[1]), kind)
            parts[name] = (dv, dr.nuclear)
        rule = "threshold" if by_threshold(p) else "top_fraction"
        chosen = select(scores, p["threshold"], 0.0 if rule == "threshold" else p["top_fraction"])
        ctx.diagnostics.of(self.name)[layer] = {
            "scores": scores, "chance": chance, "selected": chosen, "rule": rule,
            "threshold": p["threshold"] if rule == "threshold" else None, "top_fraction": p["top_fraction"]}
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

    # ---- diagnostics: ctx.diagnostics.of(name) is {layer: {"scores", "chance", "selected", "rule", "threshold", ...}}
    def summarize_diagnostics(self, extra: dict) -> tuple[dict, list[str]]:
        if self.name not in extra:
            return {}, []
        d = extra[self.name]
        first = next(iter(d.values()), {})
        scores = [s for x in d.values() for s in x["scores"].values()]
        selected = {str(k): x["selected"] for k, x in d.items()}
        out = {"rule": first.get("rule"), "threshold": first.get("threshold"),
               "top_fraction": first.get("top_fraction"),
               "selected_per_layer": {k: len(v) for k, v in selected.items()},
               "selected": sum(len(v) for v in selected.values()), "matrices": len(scores)}
        warn = []
        if scores:
            q = statistics.quantiles(scores, n=4) if len(scores) > 1 else [scores[0]] * 3
            out["scores"] = {"min": min(scores), "q1": q[0], "median": q[1], "q3": q[2], "max": max(scores)}
            out["chance"] = near_chance(d)
            if out["chance"]["median_ratio"] < NEAR_CHANCE:
                c = out["chance"]
                warn.append(f"{self.name}'s similarity scores sit near chance: the median matrix scores "
                            f"{c['median_ratio']:.1f}x what unrelated directions would ({c['median']:.2f}; "
                            f"warned below {NEAR_CHANCE:g}x): the task vectors' top subspaces barely align, so "
                            "the selection rests on weak evidence")
        if scores and out["selected"] == 0 and out["rule"] == "threshold":
            warn.append(f"{self.name} selected no matrix: highest similarity {max(scores):.2f} < threshold "
                        f"{out['threshold']:.2f}; lower 'threshold' or select by 'top_fraction' (use_threshold: 0)")
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
        rule = (f"threshold {ip['threshold']:.2f}" if ip.get("rule") == "threshold"
                else f"the top {ip.get('top_fraction', 0):g} of each layer")
        line = (f"{self.name} merged {ip['selected']} of {ip['matrices']} matrices ({rule}); similarity min "
                f"{s['min']:.2f} / median {s['median']:.2f} / max {s['max']:.2f}")
        if "chance" in ip:
            line += f"; unrelated directions score about {ip['chance']['median']:.2f}"
        return [line]

    def layer_note(self, diagnostics: dict, layer: str) -> str:
        per_layer = diagnostics.get(self.name, {}).get("selected_per_layer", {})
        return f"; {self.name} merged {per_layer[layer]} matrices" if layer in per_layer else ""


def near_chance(d: dict) -> dict:
    """The median chance level over the merge's matrices and the median of score / chance."""
    pairs = [(x["scores"][n], x["chance"][n]) for x in d.values() for n in x["scores"] if n in x.get("chance", {})]
    if not pairs:
        return {"median": float("nan"), "median_ratio": float("inf")}
    ratios = [s / c if c > 0 else float("inf") for s, c in pairs]
    return {"median": statistics.median(c for _, c in pairs), "median_ratio": statistics.median(ratios)}
