"""The lab's jargon in plain words, and the paper behind each method and plot (shown in the app)."""

from __future__ import annotations

import re

from merging import methods

# Papers that no merge method declares (DRIFT is a fine-tune, not a merge).
OTHER_PAPERS = {"DRIFT": ("DRIFT, 2025", "https://arxiv.org/abs/2510.15050")}


def _year(title: str) -> int:
    found = re.search(r"\b(19|20)\d\d\b", title)
    return int(found[0]) if found else 9999


def _papers() -> dict[str, tuple[str, str]]:
    """short name -> (citation, link): each method's paper (MergeMethod.paper), then the others; oldest
    first (a stable sort, so papers of one year keep the methods' order)."""
    found = {m.paper.short: (m.paper.title, m.paper.url) for m in methods.all_methods() if m.paper}
    found.update(OTHER_PAPERS)
    return dict(sorted(found.items(), key=lambda kv: _year(kv[1][0])))


PAPERS = _papers()

# analysis name -> the papers whose figures it reproduces
ANALYSIS_PAPERS = {"spectra": ("IP-Merging",), "similarity": ("FRANK", "IP-Merging"), "attention": ("FRANK",),
                   "knockout": ("BR2V",)}

TERMS = (
    ("W_v, W_r, W_0", "the weights of one matrix in the VLM's language model, in the reasoner, and in the base "
                      "LLM both were fine-tuned from"),
    ("task vector τ_v, τ_r", "what a fine-tune changed: τ_v = W_v − W_0 (the VLM's training), τ_r = W_r − W_0 "
                             "(the math training). Merges add or mix these"),
    ("cosine(τ_v, τ_r)", "how aligned two task vectors are, flattened: near 0 means near-orthogonal, so adding "
                         "both interferes little (FRANK Fig. 3)"),
    ("singular values σ_i", "the sizes of a matrix's independent directions, largest first; a task vector with "
                            "larger ones changes the model more"),
    ("ΣS_v / ΣS_r (nuclear-norm ratio)", "the sum of τ_v's singular values over τ_r's; IP-Merging rescales τ_r "
                                         "by it (λ_n) so the reasoner's update is the VLM's size"),
    ("subspace similarity, rank", "how much the top-`rank` singular directions of τ_v and τ_r overlap (0 to 1); "
                                  "IP-Merging merges only matrices whose score passes its threshold"),
    ("γ (gamma)", "IP-Merging's per-matrix weight: a softmax of the similarity scores within a layer"),
    ("a_l, β (attention decay)", "a_l: the share of the text's attention that goes to image tokens in layer l; β: "
                                 "the rate of its exponential fit a_l ≈ C·exp(−β l); FRANK keeps early, image-heavy "
                                 "layers closer to the VLM"),
    ("w_v, λ_v, λ_r", "FRANK's per-layer weights of the VLM and the reasoner"),
    ("knockout", "set one layer's attention or MLP weights to 1/out and re-score: a skill needs that layer where "
                 "its drop is outside its 95% interval and text_math (no image, the control) drops much less "
                 "(BR2V: perception early, reasoning later)"),
    ("relative norm change", "‖W − W_v‖ / ‖W_v‖ of the merged weights: how far the merge moved the VLM, as a "
                             "ratio of norms (not a share of weights changed)"),
    ("DRIFT and its modes", "not a merge: a short fine-tune of the VLM whose every gradient step is bent toward "
                            "the reasoner (D = W_r − W_v). absolute: subtract α·D (rescaled to the weight's norm); "
                            "gradnorm: subtract α·‖g‖ along D; adaptive_cosine (default): the same, scaled by how "
                            "much g already agrees with D"),
)


def paper_link(method: str) -> str:
    """Markdown link to the paper a method follows, or ''."""
    paper = methods.get(method).paper if method in methods.names() else None
    return f"[{paper.title}]({paper.url})" if paper else ""


def analysis_links(name: str) -> str:
    """'Papers: [..](..), [..](..)' for an analysis, or ''."""
    keys = ANALYSIS_PAPERS.get(name, ())
    return ("Papers: " + ", ".join(f"[{PAPERS[k][0]}]({PAPERS[k][1]})" for k in keys)) if keys else ""


def markdown() -> str:
    terms = "\n".join(f"- **{t}**: {d}." for t, d in TERMS)
    papers = "\n".join(f"- {k}: [{title}]({url})" for k, (title, url) in PAPERS.items())
    return f"{terms}\n\n**Papers**\n\n{papers}"
