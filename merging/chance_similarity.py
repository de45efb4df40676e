"""What IP-Merging's subspace similarity scores for unrelated task vectors: the chance level that
the merge report compares the real scores with (docs/METHODS.md, ip_merging).

- "paired" (sum_i S_i |<v_r,i, v_v,i>| / sum_i S_i): each |cosine| of two independent uniformly
  random unit vectors in R^d has mean Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)) ~ sqrt(2 / (pi d)),
  and a weighted mean of such terms has the same mean.
- "subspace" (the mean cosine of the principal angles of two random k-dimensional subspaces of
  R^d): no closed form; the mean over CHANCE_DRAWS seeded draws (QR of Gaussian d x k matrices).
  Past MAX_DRAW_ELEMENTS entries per draw, the small-k/d limit (8 / (3 pi)) sqrt(k / d) instead
  (the quarter-circle law's mean singular value), capped at 1.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

CHANCE_DRAWS = 8
MAX_DRAW_ELEMENTS = 1 << 22  # d * k of one Gaussian draw (32 MB of float64)


def paired_chance(d: int) -> float:
    """E|<u, w>| for independent uniformly random unit vectors u, w in R^d."""
    if d <= 1:
        return 1.0
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


@lru_cache(maxsize=256)
def subspace_chance(d: int, k: int) -> float:
    """E[mean cosine of the principal angles] of two random k-dimensional subspaces of R^d."""
    k = min(k, d)
    if k <= 0:
        return 0.0
    if k == d:
        return 1.0
    if d * k > MAX_DRAW_ELEMENTS:
        return min(1.0, 8 / (3 * math.pi) * math.sqrt(k / d))
    g = torch.Generator().manual_seed(d * 100_003 + k)
    total = 0.0
    for _ in range(CHANCE_DRAWS):
        q1 = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
        total += float(torch.linalg.svdvals(q1.T @ q2).clamp(0, 1).mean())
    return total / CHANCE_DRAWS


def chance(d: int, k: int, kind: str) -> float:
    """The score of `kind` ("paired" or "subspace") for unrelated top-k bases of a matrix with d columns."""
    return subspace_chance(d, k) if kind == "subspace" else paired_chance(d)
