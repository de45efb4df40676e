"""The gated subspaces of a reasoner's task vector: what FRISM's gates scale (the method:
merging/methods/frism.py; the gates' learning: merging/gate_learning.py; the math and every
choice: docs/METHODS.md, `## frism`).

One matrix's task vector tau = W_r - W_0 is cut into pieces along its right singular vectors: the
top `rank` directions in `groups` contiguous groups V_1..V_G (largest singular values first), and,
when rank is below the matrix's, the tail (every other direction). With one gate per piece,

  delta(g) = g_tail tau + sum_i (g_i - g_tail) (tau V_i) V_i^T
           = sum_i g_i U_i S_i V_i^T + g_tail (tau - tau V V^T),

so every gate 1 is tau itself (task arithmetic at alpha 1) and every gate 0 adds nothing. The
merge and the learning both go through `delta`, so the learned gates scale exactly what is merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from merging import decomposition_cache


@dataclass
class Pieces:
    """One matrix's gated pieces: the groups' right singular vectors (d_in x r_i), whether a tail
    gate follows them, and each piece's squared singular values summed (E_i, the tail's last)."""

    vs: list[torch.Tensor]
    tail: bool
    energy: list[float] = field(default_factory=list)

    @property
    def gates(self) -> int:
        return len(self.vs) + int(self.tail)


def pieces(tau: torch.Tensor, rank: int, groups: int, alias: str | None = None) -> Pieces:
    """The gated pieces of one task vector (2-D, float32): top-`rank` basis from the decomposition
    cache, cut into min(groups, rank) contiguous groups."""
    k = max(1, min(int(rank), min(tau.shape)))
    (dec,) = decomposition_cache.decompose_cached([decomposition_cache.Request(tau, alias=alias)], k, "auto")
    v = dec.v[:, :k].to(tau.device)
    cuts = torch.tensor_split(torch.arange(k), min(int(groups), k))
    s2 = dec.s[:k].double().square()
    total = float(tau.double().square().sum())
    energy = [float(s2[c].sum()) for c in cuts]
    tail = k < min(tau.shape)
    if tail:
        energy.append(max(0.0, total - float(s2.sum())))
    return Pieces([v[:, c].contiguous() for c in cuts], tail, energy)


def delta(tau: torch.Tensor, p: Pieces, g) -> torch.Tensor:
    """The injected update of one matrix for gates g (a list, or a tensor that may need a gradient).
    Built in one full-size buffer, each piece added as a rank-r_i product; under autograd the gates'
    gradient is formed from rank-r_i products too (_GatedDelta), so learning keeps no full-size
    intermediate per piece."""
    if isinstance(g, torch.Tensor) and g.requires_grad and torch.is_grad_enabled():
        return _GatedDelta.apply(g, tau, p)
    return _build(tau, p, torch.as_tensor(g, dtype=tau.dtype, device=tau.device))


def _build(tau: torch.Tensor, p: Pieces, g: torch.Tensor) -> torch.Tensor:
    g = g.detach().to(tau.dtype)
    out = tau * g[-1] if p.tail else torch.zeros_like(tau)
    for i, v in enumerate(p.vs):
        out.addmm_((tau @ v) * (g[i] - g[-1] if p.tail else g[i]), v.T)
    return out


class _GatedDelta(torch.autograd.Function):
    """delta(g) with d<G, delta>/dg_i = <G, (tau V_i) V_i^T> = sum((G V_i) * (tau V_i)), and, with a
    tail gate, d/dg_tail = <G, tau> - sum_i of those: autograd through the plain formula would keep
    every piece's (tau V_i) V_i^T, several copies of all gated weights at once."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, tau: torch.Tensor, p: Pieces) -> torch.Tensor:
        ctx.tau, ctx.p = tau, p  # held by the caller anyway: nothing is copied
        return _build(tau, p, g)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tau, p = ctx.tau, ctx.p
        inner = [((grad @ v).float() * (tau @ v).float()).sum() for v in p.vs]
        if p.tail:
            inner.append(torch.sum(grad * tau, dtype=torch.float32) - sum(inner))
        return torch.stack(inner), None, None


def injected(energies: list[torch.Tensor], gates: list[torch.Tensor]) -> torch.Tensor:
    """R(g): the mean over matrices of sum_i g_i^2 E_i / sum_i E_i, in [0, 1] for gates in [0, 1]."""
    parts = [(g.square() * e).sum() / e.sum().clamp_min(1e-30) for g, e in zip(gates, energies)]
    return torch.stack(parts).mean()
