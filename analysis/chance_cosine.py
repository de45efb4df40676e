"""What cosine two unrelated task vectors of given shapes show: the similarity plot's random baseline.

For u, w independent and isotropic in R^d (e.g. i.i.d. Gaussian entries), cos(u, w) has mean 0 and
variance exactly 1/d, and sqrt(d) cos(u, w) -> N(0, 1) as d grows. So for a d-element matrix a cosine
inside +-1.96/sqrt(d) is what chance alone gives 95% of the time: "near 0" gets a scale. The whole
block's cosine is one cosine of its concatenated tensors, d = the block's element count.
"""

from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95% quantile of N(0, 1)


def chance_band(numel: int, z: float = Z95) -> float:
    """Half-width of the central 95% of cos(u, w) for random u, w of `numel` elements."""
    if numel <= 0:
        return 1.0
    return min(1.0, z / math.sqrt(numel))


def bands(sim: dict) -> tuple[dict[str, float], list[float]] | None:
    """(per module, per layer's whole block) half-widths of a similarity result; None for a result
    computed before the element counts were kept."""
    numel, block = sim.get("numel"), sim.get("block_numel")
    if not numel or not block:
        return None
    return {m: chance_band(d) for m, d in numel.items()}, [chance_band(d) for d in block]
