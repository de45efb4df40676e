"""Singular-value helpers shared by IP-Merging and the spectra/similarity analyses.

One decomposition per matrix (`decompose`, `decompose_many` for a batch): the top-k singular
values and right singular vectors, every singular value (exact solver), and the exact nuclear
norm. One implementation of the subspace similarity, so the number a user sees in the heatmap is
exactly the number ip_merging thresholds on. `merging.decomposition_cache` keeps these on disk.

Exact quantities come from the eigen-decomposition of the smaller Gram matrix in float64
(M^T M or M M^T): its eigenvalues are the squared singular values, so the nuclear norm never
needs a full SVD of the long matrix, and float64 keeps the small singular values of an
ill-conditioned matrix within ~1e-8 of the largest (the square root of the Gram's rounding).
The randomized solver (torch.svd_lowrank) is used only for the top-k basis of large matrices,
never for the nuclear norm. The same code runs on CUDA: the float64 Gram and eigh then run on
the device.

"fast" [choice, the spectra and similarity analyses only; never ip_merging]: the same Gram
eigen-decomposition in float32, about half the work of the float64 one on a CPU. Squaring loses
the small singular values of an ill-conditioned matrix in float32 (a rank-4 matrix's nuclear norm
comes out ~1% high), so each result carries a first-order bound on its nuclear norm's relative
error, and a matrix whose bound exceeds FAST_NUCLEAR_RTOL is decomposed by the exact solver
instead. Its results are marked exact=False and never stand in for exact ones.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Matrices with min(rows, cols) above this use the randomized top-k basis when method="auto".
EXACT_SVD_MAX_DIM = 1024
SIMILARITIES = ("paired", "subspace")
# float64 copies stacked for one batched Gram/eigh call: bounds the extra memory of a batch.
BATCH_BYTES = 256 * 2**20
# CPU eigh of Gram matrices up to this size runs on one thread: MKL's tridiagonalisation
# synchronises its threads once per column, and on a shared 2-core machine each stalled
# barrier costs a time slice (measured: 4 eighs of 768 x 768, 1.2 s on 1 thread, 27 s on 2).
SINGLE_THREAD_EIGH_MAX = 2048
SOLVERS = ("exact", "lowrank", "auto", "fast")
# The "fast" solver's acceptance bound on the relative error of a float32 nuclear norm. The bound
# assumes eigenvalue errors of FAST_EIG_ERROR * eps32 * lambda_max; measured errors (float32 Gram
# rounding + ssyevd, matrices up to 4864 x 896) stayed below 1 * eps32 * lambda_max.
FAST_NUCLEAR_RTOL = 1e-5
FAST_EIG_ERROR = 4.0


@dataclass
class Decomposition:
    """Top-k of one matrix: singular values s (descending, float64), right singular vectors as the
    columns of v (float32, on the matrix's device), the nuclear norm (exact; within
    FAST_NUCLEAR_RTOL from the "fast" solver), whether s and v came from the exact solver, and
    (exact and fast solvers) every singular value, descending, float64."""

    s: torch.Tensor
    v: torch.Tensor
    nuclear: float
    exact: bool
    all_s: torch.Tensor | None = None


def solver(shape, k: int | None, method: str) -> str:
    """The solver `method` resolves to for a matrix of this shape: "exact", "lowrank" or "fast"."""
    if method not in SOLVERS:
        raise ValueError(f"svd method must be one of {', '.join(SOLVERS)}, not {method!r}")
    if method != "auto":
        return method
    full = min(shape)
    kk = full if k is None else max(1, min(int(k), full))
    return "lowrank" if full > EXACT_SVD_MAX_DIM and kk < full // 2 else "exact"


@contextlib.contextmanager
def _eigh_threads(g: torch.Tensor):
    if g.device.type != "cpu" or g.shape[-1] > SINGLE_THREAD_EIGH_MAX or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gram(m64: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of a (batch of) float64 matrix, and whether it is M^T M (its
    eigenvectors are then V)."""
    wide = m64.shape[-1] > m64.shape[-2]
    return (m64 @ m64.mT if wide else m64.mT @ m64), not wide


def eigh(g: torch.Tensor, values_only: bool = False):
    with _eigh_threads(g):
        return torch.linalg.eigvalsh(g) if values_only else torch.linalg.eigh(g)


def gram_singular_values(m: torch.Tensor) -> torch.Tensor:
    """Every singular value of a 2-D matrix, descending, float64, from the smaller Gram matrix."""
    g, _ = _gram(m.double())
    return eigh(g, values_only=True).clamp_min_(0).sqrt_().flip(-1)


def nuclear_norm(m: torch.Tensor) -> float:
    return float(gram_singular_values(m).sum())


def _clamp_k(m: torch.Tensor, k: int | None) -> int:
    if m.dim() != 2:
        raise ValueError(f"decompose needs a 2-D matrix, got shape {tuple(m.shape)}")
    full = min(m.shape)
    return full if k is None else max(1, min(int(k), full))


def _exact_batch(m64: torch.Tensor, k: int) -> list[Decomposition]:
    """Exact decompositions of a stack of equal-shape float64 matrices (one batched Gram + eigh)."""
    g, is_vtv = _gram(m64)
    evals, evecs = eigh(g)
    del g
    s_all = evals.clamp_min_(0).sqrt_().flip(-1)
    vecs = evecs[..., evecs.shape[-1] - k:].flip(-1)  # only the top k: flipping all n copies n x n
    del evecs
    if not is_vtv:  # eigenvectors are U: V = M^T U / s (only for the top k, where s > 0)
        s_k = s_all[:, :k]
        safe = torch.where(s_k > 0, s_k, torch.ones_like(s_k))
        vecs = (m64.mT @ vecs) / safe.unsqueeze(1)
        vecs.masked_fill_((s_k <= 0).unsqueeze(1), 0.0)
    nuclear = s_all.sum(-1).tolist()
    return [Decomposition(s_all[i, :k].clone(), vecs[i].float().contiguous(), nuclear[i], True, s_all[i].clone())
            for i in range(m64.shape[0])]


def float32_nuclear_bound(lam: torch.Tensor) -> float:
    """First-order bound on the relative error of sum(sqrt(lam)), lam the eigenvalues of a float32
    Gram matrix, each off by at most e = FAST_EIG_ERROR * eps32 * max(lam): a singular value moves
    by at most min(sqrt(e), e / (2 sigma)), which is large only for the small ones."""
    lam = lam.double().clamp_min(0)
    top = float(lam.max()) if lam.numel() else 0.0
    if top == 0.0:
        return 0.0
    e = FAST_EIG_ERROR * torch.finfo(torch.float32).eps * top
    s = lam.sqrt()
    err = torch.minimum(torch.full_like(s, math.sqrt(e)), e / (2 * s.clamp_min(1e-300)))
    return float(err.sum() / s.sum())


_side_by_side = threading.local()


@contextlib.contextmanager
def side_by_side(workers: int):
    """Within the block, on a CPU running one intra-op thread, the fast solver decomposes up to
    `workers` matrices at once, each single-threaded: a busy core then delays one matrix instead
    of stalling every op at a thread barrier (measured, 8 Gram + eigh of the Qwen2-0.5B shapes
    at load ~1.3 on 2 cores: 0.72 s one by one, 0.56 s two at a time)."""
    before = getattr(_side_by_side, "workers", 1)
    _side_by_side.workers = max(1, int(workers))
    try:
        yield
    finally:
        _side_by_side.workers = before


def _gram_eigh(m: torch.Tensor, wide: bool):
    return eigh(m @ m.mT if wide else m.mT @ m)


def _fast_batch(mats: list[torch.Tensor], k: int) -> list[Decomposition | None]:
    """"fast" decompositions of equal-shape matrices: float32 Gram and eigh, per matrix (side by
    side where side_by_side allows). None where the nuclear norm's bound exceeds
    FAST_NUCLEAR_RTOL (the caller decomposes those exactly). all_s holds every singular value,
    as float32 gives them."""
    m32 = [m.float() for m in mats]
    wide = m32[0].shape[-1] > m32[0].shape[-2]
    workers = min(len(m32), getattr(_side_by_side, "workers", 1))
    if workers > 1 and m32[0].device.type == "cpu" and torch.get_num_threads() == 1:
        with ThreadPoolExecutor(workers) as pool:
            eig = list(pool.map(lambda m: _gram_eigh(m, wide), m32))
    else:
        eig = [_gram_eigh(m, wide) for m in m32]
    out: list[Decomposition | None] = []
    for m, (evals, evecs) in zip(m32, eig):
        lam = evals.flip(-1)
        if float32_nuclear_bound(lam) > FAST_NUCLEAR_RTOL:
            out.append(None)
            continue
        s_all = lam.double().clamp_min(0).sqrt()
        vecs = evecs[:, evecs.shape[-1] - k:].flip(-1)
        if wide:  # eigenvectors are U: V = M^T U / s (top k only, where s > 0)
            s_k = s_all[:k].float()
            vecs = (m.mT @ vecs) / torch.where(s_k > 0, s_k, torch.ones_like(s_k))
            vecs.masked_fill_(s_k <= 0, 0.0)
        out.append(Decomposition(s_all[:k].clone(), vecs.contiguous(), float(s_all.sum()), False, s_all))
    return out


def _fast_ok() -> bool:
    # Reduced-precision float32 matmuls (TF32, bf16 passes) would void the error bound.
    return torch.get_float32_matmul_precision() == "highest"


def _lowrank(m: torch.Tensor, k: int, seed: int) -> Decomposition:
    # Oversample and iterate a little: the top singular values come out within ~1e-3.
    q = min(min(m.shape), k + 10)
    with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(m.float(), q=q, niter=4)
    return Decomposition(s[:k].double(), v[:, :k].contiguous(), nuclear_norm(m), False)


def decompose_many(mats: list[torch.Tensor], k: int | None = None, method: str = "auto",
                   seed: int = 0) -> list[Decomposition]:
    """decompose() of each matrix; exact ones of equal shape (and device) share one batched
    float64 Gram + eigh call (chunked to BATCH_BYTES of float64 copies); "fast" ones are
    decomposed one by one (or side by side), and those whose bound fails join the exact ones."""
    out: list[Decomposition | None] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    fast: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        kk = _clamp_k(m, k)
        how = solver(m.shape, kk, method)
        if how == "lowrank":
            out[i] = _lowrank(m, kk, seed)
        elif how == "fast" and _fast_ok():
            fast.setdefault((tuple(m.shape), str(m.device), kk), []).append(i)
        else:
            groups.setdefault((tuple(m.shape), str(m.device), kk), []).append(i)
    for (shape, dev, kk), idx in fast.items():
        per = max(1, BATCH_BYTES // (4 * min(shape) ** 2))
        for start in range(0, len(idx), per):
            chunk = idx[start:start + per]
            for i, d in zip(chunk, _fast_batch([mats[i] for i in chunk], kk)):
                if d is None:
                    groups.setdefault((shape, dev, kk), []).append(i)
                out[i] = d
    for (shape, _, kk), idx in groups.items():
        per = max(1, BATCH_BYTES // (8 * shape[0] * shape[1]))
        for start in range(0, len(idx), per):
            chunk = idx[start:start + per]
            m64 = torch.empty((len(chunk), *shape), dtype=torch.float64, device=mats[chunk[0]].device)
            for j, i in enumerate(chunk):
                m64[j].copy_(mats[i])
            for i, d in zip(chunk, _exact_batch(m64, kk)):
                out[i] = d
            del m64
    return out  # type: ignore[return-value]


def decompose(m: torch.Tensor, k: int | None = None, method: str = "auto", seed: int = 0) -> Decomposition:
    """Top-k singular values and right singular vectors of a 2-D matrix, and its exact nuclear norm.

    method: "exact" (Gram eigen-decomposition, float64), "lowrank" (randomized top-k basis,
    seeded; the nuclear norm stays exact), "auto" (exact unless the matrix is large and k small),
    or "fast" (the Gram eigen-decomposition in float32 where its nuclear-norm bound allows, else
    exact; for the analyses).
    """
    return decompose_many([m], k, method, seed)[0]


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
