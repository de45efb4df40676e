"""How aligned the two task vectors are, per decoder layer.

- cosine(tau_v, tau_r), flattened per module and per whole block (FRANK Fig. 3 finds values near
  0 everywhere: the VLM's and the reasoner's updates are near-orthogonal, which is why adding
  them interferes little);
- the IP-Merging subspace similarity per module (merging.linalg.subspace_similarity, the very
  number ip_merging compares with its threshold).
"""

from __future__ import annotations

import torch

from analysis.spectra import MODULES, Triple, cached_on_triple, grid, matrices
from merging.linalg import subspace_similarity


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors flattened, in float32 (0 when either is all zeros)."""
    a, b = a.float().flatten(), b.float().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def compute_similarity(triple: Triple, rank: int = 32, method: str = "auto", device="cpu", progress=None) -> dict:
    """Per-module cosine + subspace similarity and per-block cosine; plain data.

    Returns {"rank", "method", "num_layers", "modules", "entries": [{"layer", "module", "cos",
    "subspace"}], "cos": [[...]], "subspace": [[...]], "block_cos": [per layer]}.
    The block cosine covers every tensor of the block the three models share (norms included),
    accumulated as dot products so no block is ever concatenated in memory.
    """
    todo = matrices(triple)
    mats = {c for _, _, c in todo}
    n = triple.num_layers
    total = len(todo) + n
    done = 0
    entries = []
    block = [{"dot": 0.0, "vv": 0.0, "rr": 0.0} for _ in range(n)]
    for layer in range(n):
        for canonical in triple.layer_names(layer):
            tau_v, tau_r = triple.task_vectors(canonical, device)
            acc = block[layer]
            acc["dot"] += float(tau_v.flatten() @ tau_r.flatten())
            acc["vv"] += float(tau_v.pow(2).sum())
            acc["rr"] += float(tau_r.pow(2).sum())
            if canonical not in mats:
                continue
            module = canonical[len(f"layers.{layer}."):-len(".weight")]
            if progress:
                progress(done, total, f"similarity: layer {layer} {module}")
            entries.append({"layer": layer, "module": module, "cos": cosine(tau_v, tau_r),
                            "subspace": subspace_similarity(tau_v, tau_r, rank, method)})
            done += 1
        done += 1
    if progress:
        progress(total, total, "similarity: done")
    block_cos = [a["dot"] / (a["vv"] ** 0.5 * a["rr"] ** 0.5) if a["vv"] > 0 and a["rr"] > 0 else 0.0
                 for a in block]
    modules = [m for m in MODULES if any(e["module"] == m for e in entries)]
    return {"rank": rank, "method": method, "num_layers": n, "modules": modules, "entries": entries,
            "cos": grid(entries, "cos", n, modules), "subspace": grid(entries, "subspace", n, modules),
            "block_cos": block_cos}


def similarity(vlm, reasoner, base, rank: int = 32, method: str = "auto", device="cpu", progress=None,
               cache_dir=None, use_cache: bool = True) -> dict:
    """Open the triple, compute (or fetch from the cache) its similarities."""
    return cached_on_triple("similarity", vlm, reasoner, base, {"rank": rank, "method": method},
                            lambda t: compute_similarity(t, rank, method, device, progress), cache_dir, use_cache)
