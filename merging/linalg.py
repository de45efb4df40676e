"""Singular-value helpers shared by IP-Merging and the spectra/similarity analyses.

One decomposition per matrix (`decompose`): the top-k singular values and right singular
vectors, and the exact nuclear norm. One implementation of the subspace similarity, so the
number a user sees in the heatmap is exactly the number ip_merging thresholds on.

Exact quantities come from the eigen-decomposition of the smaller Gram matrix in float64
(M^T M or M M^T): its eigenvalues are the squared singular values, so the nuclear norm never
needs a full SVD of the long matrix, and float64 keeps the small singular values of an
ill-conditioned matrix within ~1e-8 of the largest. The randomized solver (torch.svd_lowrank)
is used only for the top-k basis of large matrices, never for the nuclear norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Matrices with min(rows, cols) above this use the randomized top-k basis when method="auto".
EXACT_SVD_MAX_DIM = 1024
SIMILARITIES = ("paired", "subspace")


@dataclass
class Decomposition:
    """Top-k of one matrix: singular values s (descending, float64), right singular vectors as the
    columns of v (float32, on the matrix's device), the exact nuclear norm, and whether s and v
    came from an exact solver."""

    s: torch.Tensor
    v: torch.Tensor
    nuclear: float
    exact: bool


def _use_lowrank(m: torch.Tensor, k: int, method: str) -> bool:
    if method == "exact":
        return False
    if method == "lowrank":
        return True
    if method != "auto":
        raise ValueError(f"svd method must be exact, lowrank or auto, not {method!r}")
    return min(m.shape) > EXACT_SVD_MAX_DIM and k < min(m.shape) // 2


def _gram(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix in float64, and whether it is M^T M (its eigenvectors are then V)."""
    m64 = m.double()
    wide = m.shape[1] > m.shape[0]
    return (m64 @ m64.T if wide else m64.T @ m64), not wide


def gram_singular_values(m: torch.Tensor) -> torch.Tensor:
    """Every singular value of a 2-D matrix, descending, float64, from the smaller Gram matrix."""
    g, _ = _gram(m)
    return torch.linalg.eigvalsh(g).clamp_min_(0).sqrt_().flip(0)


def nuclear_norm(m: torch.Tensor) -> float:
    return float(gram_singular_values(m).sum())


def _exact_top(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g, is_vtv = _gram(m)
    evals, evecs = torch.linalg.eigh(g)
    s_all = evals.clamp_min(0).sqrt().flip(0)
    vecs = evecs.flip(1)[:, :k]
    if not is_vtv:  # eigenvectors are U: V = M^T U / s (only for the top k, where s > 0)
        s_k = s_all[:k]
        safe = torch.where(s_k > 0, s_k, torch.ones_like(s_k))
        vecs = (m.double().T @ vecs) / safe
        vecs[:, s_k <= 0] = 0
    return s_all[:k], vecs, float(s_all.sum())


def decompose(m: torch.Tensor, k: int | None = None, method: str = "auto", seed: int = 0) -> Decomposition:
    """Top-k singular values and right singular vectors of a 2-D matrix, and its exact nuclear norm.

    method: "exact" (Gram eigen-decomposition, float64), "lowrank" (randomized top-k basis,
    seeded; the nuclear norm stays exact), or "auto" (exact unless the matrix is large and k small).
    """
    if m.dim() != 2:
        raise ValueError(f"decompose needs a 2-D matrix, got shape {tuple(m.shape)}")
    full = min(m.shape)
    k = full if k is None else max(1, min(int(k), full))
    if not _use_lowrank(m, k, method):
        s, v, nuc = _exact_top(m, k)
        return Decomposition(s, v.float(), nuc, True)
    # Oversample and iterate a little: the top singular values come out within ~1e-3.
    q = min(full, k + 10)
    with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(m.float(), q=q, niter=4)
    return Decomposition(s[:k].double(), v[:, :k], nuclear_norm(m), False)


def similarity(dv: Decomposition, dr: Decomposition, kind: str = "paired") -> float:
    """IP-Merging's subspace similarity of two decompositions, in [0, 1].

    "paired" (the paper's description): sum_i S_v[i] |<v_r_i, v_v_i>| / sum_i S_v[i], pairing the
    i-th right singular vectors by index. "subspace" [choice, rotation-invariant]: the mean cosine
    of the principal angles between the two top-k subspaces, i.e. the mean singular value of
    V_v^T V_r; unlike "paired" it does not change when near-equal singular values swap order.
    """
    k = min(dv.v.shape[1], dr.v.shape[1])
    if kind == "subspace":
        if k == 0:
            return 0.0
        cos = torch.linalg.svdvals(dv.v[:, :k].double().T @ dr.v[:, :k].double())
        return float(cos.clamp(0, 1).sum()) / k
    if kind != "paired":
        raise ValueError(f"similarity must be one of {SIMILARITIES}, not {kind!r}")
    s_v = dv.s[:k]
    total = float(s_v.sum())
    if total == 0.0:
        return 0.0
    dots = (dv.v[:, :k].double() * dr.v[:, :k].double()).sum(0).abs()
    return float((s_v * dots).sum()) / total


def subspace_similarity(tau_v: torch.Tensor, tau_r: torch.Tensor, rank: int = 32, method: str = "auto",
                        kind: str = "paired") -> float:
    """similarity() of the top-`rank` decompositions of two task vectors."""
    return similarity(decompose(tau_v, rank, method), decompose(tau_r, rank, method), kind)


def top_svd(m: torch.Tensor, k: int | None = None, method: str = "auto", seed: int = 0):
    """(S[:k] float32, V[:, :k] float32) of a 2-D matrix, from decompose()."""
    d = decompose(m, k, method, seed)
    return d.s.float(), d.v


def singular_values(m: torch.Tensor, k: int | None = None, method: str = "auto") -> torch.Tensor:
    if k is None and method != "lowrank":
        return gram_singular_values(m).float()
    return decompose(m, k, method).s.float()
