"""SVD helpers shared by IP-Merging and the spectra analysis, always in float32.

One implementation of the subspace similarity, so the number a user sees in the heatmap is
exactly the number ip_merging thresholds on.
"""

from __future__ import annotations

import torch

# Matrices with min(rows, cols) above this use the randomized solver when method="auto".
EXACT_SVD_MAX_DIM = 1024


def _use_lowrank(m: torch.Tensor, k: int, method: str) -> bool:
    if method == "exact":
        return False
    if method == "lowrank":
        return True
    if method != "auto":
        raise ValueError(f"svd method must be exact, lowrank or auto, not {method!r}")
    return min(m.shape) > EXACT_SVD_MAX_DIM and k < min(m.shape) // 2


def top_svd(m: torch.Tensor, k: int | None = None, method: str = "auto", seed: int = 0):
    """Top-k singular triplets (U[:, :k], S[:k], V[:, :k]) of a 2-D matrix in float32.

    method: "exact" (torch.linalg.svd), "lowrank" (torch.svd_lowrank, randomized, seeded),
    or "auto" (exact unless the matrix is large and k small).
    """
    if m.dim() != 2:
        raise ValueError(f"top_svd needs a 2-D matrix, got shape {tuple(m.shape)}")
    m = m.float()
    full = min(m.shape)
    k = full if k is None else max(1, min(int(k), full))
    if _use_lowrank(m, k, method):
        # Oversample and iterate a little: the top singular values come out within ~1e-3.
        q = min(full, k + 10)
        with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(m, q=q, niter=4)
        return u[:, :k], s[:k], v[:, :k]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


def singular_values(m: torch.Tensor, k: int | None = None, method: str = "auto") -> torch.Tensor:
    if k is None and method != "lowrank":
        return torch.linalg.svdvals(m.float())
    return top_svd(m, k, method)[1]


def subspace_similarity(tau_v: torch.Tensor, tau_r: torch.Tensor, rank: int = 32, method: str = "auto") -> float:
    """IP-Merging similarity: sum_i S_v[i] |<v_r_i, v_v_i>| / sum_i S_v[i] over the top-`rank`
    right singular vectors (DESIGN.md section 2, marked [choice]). In [0, 1]."""
    _, s_v, v_v = top_svd(tau_v, rank, method)
    _, _, v_r = top_svd(tau_r, rank, method)
    k = min(v_v.shape[1], v_r.shape[1])
    total = float(s_v[:k].sum())
    if total == 0.0:
        return 0.0
    dots = (v_v[:, :k] * v_r[:, :k]).sum(0).abs()
    return float((s_v[:k] * dots).sum()) / total
