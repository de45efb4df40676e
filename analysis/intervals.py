"""The uncertainty of every accuracy the lab shows (pure Python: no torch, no numpy).

- An accuracy k/n gets its 95% Wilson score interval (Wilson 1927; Newcombe 1998's method 3):
  unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
- A difference between two models scored on the SAME items (a merge against the VLM, a knocked-out
  model against the intact one) gets a paired percentile bootstrap interval: the items are resampled
  with replacement, both models' answers to an item staying together, so the item-to-item
  correlation of the two models is kept (two independent intervals would overstate the noise).
  Seeded, so a table is reproducible. A difference whose interval contains 0 is "within noise".
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 2000
SEED = 0


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials; (0, 1) when n is 0 (nothing known)."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # the exact bounds at k = 0 or n are 0 and 1; rounding must not leave them a hair inside
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def accuracy(correct: Sequence[bool]) -> dict:
    """{"acc", "k", "n", "lo", "hi"} of a list of per-item outcomes."""
    k, n = sum(bool(c) for c in correct), len(correct)
    lo, hi = wilson(k, n)
    return {"acc": k / n if n else 0.0, "k": k, "n": n, "lo": lo, "hi": hi}


def bootstrap_diffs(a: Sequence[bool], b: Sequence[bool], resamples: int = RESAMPLES,
                    seed: int = SEED) -> list[float]:
    """The sorted resampled mean(b) - mean(a) over items drawn with replacement, pairs kept."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap: {len(a)} and {len(b)} outcomes are not the same items")
    n = len(a)
    if n == 0:
        return [0.0]
    d = [int(bool(y)) - int(bool(x)) for x, y in zip(a, b)]
    rng = random.Random(seed)
    return sorted(sum(rng.choices(d, k=n)) / n for _ in range(resamples))


def _quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics."""
    pos = q * (len(sorted_values) - 1)
    i = int(pos)
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (pos - i) * (sorted_values[j] - sorted_values[i])


def paired_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = RESAMPLES,
                      seed: int = SEED) -> dict:
    """b's accuracy minus a's on the same items: {"diff", "lo", "hi", "noise"}, a 95% paired
    bootstrap interval; noise: the interval contains 0."""
    n = len(a)
    diff = (sum(map(bool, b)) - sum(map(bool, a))) / n if n else 0.0
    dist = bootstrap_diffs(a, b, resamples, seed)
    lo, hi = _quantile(dist, 0.025), _quantile(dist, 0.975)
    return {"diff": diff, "lo": lo, "hi": hi, "noise": lo <= 0.0 <= hi}


def half_width(lo: float, hi: float) -> float:
    return (hi - lo) / 2


def fmt_acc(iv: dict, percent: bool = False) -> str:
    """"0.62 [0.54, 0.70]" (or "62.0% [54.0, 70.0]") of an accuracy() result."""
    if percent:
        return f"{100 * iv['acc']:.1f}% [{100 * iv['lo']:.1f}, {100 * iv['hi']:.1f}]"
    return f"{iv['acc']:.2f} [{iv['lo']:.2f}, {iv['hi']:.2f}]"


def fmt_diff(iv: dict, percent: bool = True) -> str:
    """"+4.0 [-2.7, +10.7] within noise" (points) of a paired_difference() result."""
    s = 100 if percent else 1
    spec = "+.1f" if percent else "+.2f"
    text = f"{format(s * iv['diff'], spec)} [{format(s * iv['lo'], spec)}, {format(s * iv['hi'], spec)}]"
    return text + (" within noise" if iv["noise"] else "")
