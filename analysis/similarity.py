"""How aligned the two task vectors are, per decoder layer.

- cosine(tau_v, tau_r), flattened per module and per whole block (FRANK Fig. 3 finds values near
  0 everywhere: the VLM's and the reasoner's updates are near-orthogonal, which is why adding
  them interferes little);
- the IP-Merging subspace similarity per module (merging.linalg.similarity, the function
  ip_merging thresholds on). The decompositions are the exact ones ip_merging filed when the cache
  has them, else those of the "fast" float32 solver the spectra filed (analysis.spectra): on the
  Qwen2-0.5B-shaped triple the scores agree with the exact ones to ~1e-6. method="exact" gives
  ip_merging's own number in every case.
"""

from __future__ import annotations

import math

import torch

from analysis.spectra import (
    MODULES,
    Triple,
    cached_on_triple,
    dot_stats,
    file_layer_dots,
    grid,
    layer_decompositions,
    layer_dots,
    matrices,
    one_thread,
)
from merging.linalg import similarity as linalg_similarity


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors flattened, in float32 (0 when either is all zeros)."""
    a, b = a.float().flatten(), b.float().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def _numel(triple: Triple, canonical: str) -> int:
    """Elements of a task vector (from the header: no tensor read), the d of its random baseline."""
    return math.prod(triple.vlm.shape(triple.layouts["vlm"].lm[canonical]))


def _cos(dot: float, vv: float, rr: float) -> float:
    return dot / (vv ** 0.5 * rr ** 0.5) if vv > 0 and rr > 0 else 0.0


def compute_similarity(triple: Triple, rank: int = 32, method: str = "fast", device="cpu", progress=None,
                       cache_dir=None, use_cache: bool = True) -> dict:
    """Per-module cosine + subspace similarity and per-block cosine; plain data.

    Returns {"rank", "method", "num_layers", "modules", "entries": [{"layer", "module", "cos",
    "subspace"}], "cos": [[...]], "subspace": [[...]], "block_cos": [per layer]}.
    The block cosine covers every tensor of the block the three models share (norms included),
    accumulated as dot products so no block is ever concatenated in memory. The dot products and
    the decompositions come from the decomposition cache's folder when the spectra (or ip_merging,
    for the decompositions) filed them: after the spectra, no tensor is read again.
    """
    with one_thread(device, progress) as progress:
        mats = {c: m for _, m, c in matrices(triple)}
        n = triple.num_layers
        entries = []
        block_cos, block_numel, numel = [], [], {}
        for layer in range(n):
            if progress:
                progress(layer, n, f"similarity: layer {layer}")
            pairs: dict[str, tuple] = {}
            stats = layer_dots(triple, layer, cache_dir, use_cache)
            if stats is None:  # not filed by the spectra: read the block once, for both uses
                stats = {}
                for canonical in triple.layer_names(layer):
                    tau_v, tau_r = triple.task_vectors(canonical, device)
                    stats[canonical] = dot_stats(tau_v, tau_r)
                    if canonical in mats:
                        pairs[canonical] = (tau_v, tau_r)
                file_layer_dots(triple, layer, pairs, device, cache_dir, use_cache, stats)
            dot, vv, rr = (sum(v[i] for v in stats.values()) for i in range(3))
            block_cos.append(_cos(dot, vv, rr))
            block_numel.append(sum(_numel(triple, c) for c in stats))
            names = [c for c in triple.layer_names(layer) if c in mats]
            numel.update({mats[c]: _numel(triple, c) for c in names})
            # The decompositions' tensors are read only on a cache miss.
            decs = layer_decompositions(triple, names, rank, method, device, True, cache_dir, pairs, use_cache)
            for canonical, (dv, dr) in zip(names, decs):
                entries.append({"layer": layer, "module": mats[canonical], "cos": _cos(*stats[canonical]),
                                "subspace": linalg_similarity(dv, dr)})
            del pairs
        if progress:
            progress(n, n, "similarity: done")
        modules = [m for m in MODULES if any(e["module"] == m for e in entries)]
        return {"rank": rank, "method": method, "num_layers": n, "modules": modules, "entries": entries,
                "cos": grid(entries, "cos", n, modules), "subspace": grid(entries, "subspace", n, modules),
                "block_cos": block_cos, "numel": numel, "block_numel": block_numel}


def similarity(vlm, reasoner, base, rank: int = 32, method: str = "fast", device="cpu", progress=None,
               cache_dir=None, use_cache: bool = True) -> dict:
    """Open the triple, compute (or fetch from the cache) its similarities."""
    # "numel": the results carry the element counts of the random baseline (analysis.chance_cosine)
    return cached_on_triple("similarity", vlm, reasoner, base, {"rank": rank, "method": method, "numel": True},
                            lambda t: compute_similarity(t, rank, method, device, progress, cache_dir, use_cache),
                            cache_dir, use_cache)
