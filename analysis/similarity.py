"""How aligned the two task vectors are, per decoder layer.

- cosine(tau_v, tau_r), flattened per module and per whole block (FRANK Fig. 3 finds values near
  0 everywhere: the VLM's and the reasoner's updates are near-orthogonal, which is why adding
  them interferes little);
- the IP-Merging subspace similarity per module (merging.linalg.similarity of the cached
  decompositions ip_merging uses: the very number it compares with its threshold).
"""

from __future__ import annotations

import torch

from analysis.spectra import MODULES, Triple, cached_on_triple, grid, layer_decompositions, matrices
from merging.linalg import similarity as linalg_similarity


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors flattened, in float32 (0 when either is all zeros)."""
    a, b = a.float().flatten(), b.float().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def compute_similarity(triple: Triple, rank: int = 32, method: str = "auto", device="cpu", progress=None,
                       cache_dir=None, use_cache: bool = True) -> dict:
    """Per-module cosine + subspace similarity and per-block cosine; plain data.

    Returns {"rank", "method", "num_layers", "modules", "entries": [{"layer", "module", "cos",
    "subspace"}], "cos": [[...]], "subspace": [[...]], "block_cos": [per layer]}.
    The block cosine covers every tensor of the block the three models share (norms included),
    accumulated as dot products so no block is ever concatenated in memory. The decompositions come
    from the decomposition cache ip_merging and the spectra share (one batched call per layer).
    """
    mats = {c: m for _, m, c in matrices(triple)}
    n = triple.num_layers
    entries = []
    block_cos = []
    for layer in range(n):
        if progress:
            progress(layer, n, f"similarity: layer {layer}")
        pairs: dict[str, tuple] = {}
        dot = vv = rr = 0.0
        for canonical in triple.layer_names(layer):
            tau_v, tau_r = triple.task_vectors(canonical, device)
            dot += float(tau_v.flatten() @ tau_r.flatten())
            vv += float(tau_v.pow(2).sum())
            rr += float(tau_r.pow(2).sum())
            if canonical in mats:
                pairs[canonical] = (tau_v, tau_r)
        block_cos.append(dot / (vv ** 0.5 * rr ** 0.5) if vv > 0 and rr > 0 else 0.0)
        names = list(pairs)
        decs = layer_decompositions(triple, names, rank, method, device, True, cache_dir, pairs, use_cache)
        for canonical, (dv, dr) in zip(names, decs):
            tau_v, tau_r = pairs[canonical]
            entries.append({"layer": layer, "module": mats[canonical], "cos": cosine(tau_v, tau_r),
                            "subspace": linalg_similarity(dv, dr)})
    if progress:
        progress(n, n, "similarity: done")
    modules = [m for m in MODULES if any(e["module"] == m for e in entries)]
    return {"rank": rank, "method": method, "num_layers": n, "modules": modules, "entries": entries,
            "cos": grid(entries, "cos", n, modules), "subspace": grid(entries, "subspace", n, modules),
            "block_cos": block_cos}


def similarity(vlm, reasoner, base, rank: int = 32, method: str = "auto", device="cpu", progress=None,
               cache_dir=None, use_cache: bool = True) -> dict:
    """Open the triple, compute (or fetch from the cache) its similarities."""
    return cached_on_triple("similarity", vlm, reasoner, base, {"rank": rank, "method": method},
                            lambda t: compute_similarity(t, rank, method, device, progress, cache_dir, use_cache),
                            cache_dir, use_cache)
