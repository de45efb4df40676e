"""The names of merged weights: a merge key (what a merge's result depends on besides the triple)
and a weights id (which weights are live, for caches). A cache key built from them describes
exactly what was computed."""

from __future__ import annotations

import hashlib
import json

from merging.checkpoint import Checkpoint
from merging.item_file import set_digest


def merge_key(recipe) -> str:
    """What a merge's weights depend on besides the triple (method, knobs with defaults filled in,
    layers, embeddings, dtypes, seed, the prompts a method learned from), hashed: the name of a merged
    state."""
    d = {"method": recipe.method, "knobs": recipe.knobs(), "layers": list(recipe.layers) if recipe.layers else None,
         "embeddings": recipe.embeddings, "dtype": recipe.dtype, "out_dtype": recipe.out_dtype, "seed": recipe.seed}
    if getattr(recipe, "prompts", None):  # what the gates were learned from: the files' bytes, not their path
        d["prompts"] = set_digest(recipe.prompts)
    text = json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_id(fingerprints: dict[str, str], key: str | None) -> str:
    """Identity of a set of live weights, for caches: the VLM checkpoint's fingerprint for the
    original (key None), else a hash of the triple's fingerprints and the merge key."""
    if key is None:
        return f"checkpoint:{fingerprints['vlm']}"
    text = json.dumps([dict(sorted(fingerprints.items())), key], separators=(",", ":"))
    return f"merge:{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def triple_fingerprints(vlm_ref: str, reasoner_ref: str, base_ref: str | None = None) -> dict[str, str]:
    """{"vlm", "reasoner"[, "base"]} -> checkpoint fingerprint, the roles weights_id() expects."""
    out = {}
    for role, ref in (("vlm", vlm_ref), ("reasoner", reasoner_ref), ("base", base_ref)):
        if ref:
            with Checkpoint.open(ref) as ck:
                out[role] = ck.fingerprint
    return out
