"""Generalized task arithmetic (mergekit's documented semantics), shared by `ties`, `dare_ties` and
`dare_linear`: one class, each method a subclass that sets how it sparsifies and whether signs vote.

Models: the VLM-LM (weight `weight_vlm`) and the reasoner (weight `alpha`) over the base.
1. task vectors tau_i = W_i - W_0, each sparsified with `density`
   (magnitude, ties: keep the top int(density * numel) entries by |value|, no rescale;
    bernoulli, dare: keep-mask with p = density, then `rescale`: l1 (default, mergekit's
    `rescale: true`) multiplies the survivors by ||tau_i||_1 / ||kept||_1 so the task vector keeps
    its L1 norm; inverse_density (the DARE paper) divides them by density; none leaves them);
2. weighted deltas d_i = w_i tau_i;
3. consensus (ties, dare_ties): sign = +1 where sum_i d_i >= 0 else -1; m_i = (sign(d_i) == sign);
   merged = sum_i d_i m_i, normalize divides by sum_i w_i m_i;
   no consensus (dare_linear): merged = sum_i d_i, normalize divides by sum_i w_i;
   a divisor with |.| < 1e-8 is set to 1 (entries no model kept stay 0);
4. W = W_0 + lam * merged.
Defaults follow mergekit's for the same names: normalize on for ties, off for dare_ties and dare_linear.
[choice] density defaults to 0.5 (mergekit's 1.0 would switch the sparsification off).

`br2v: 1` reproduces the Bring-Reason-to-Vision reference code instead [choice, documented in
docs/METHODS.md]: the sign is elected on the *unweighted* sparsified task vectors, the agreeing
weighted deltas are divided by the *count* of agreeing models (at least 1) rather than their
weights, DARE's survivors are not rescaled (the reference's rescale discards its result), and
dare_linear is a plain weighted sum; `normalize` and `rescale` are then ignored.
"""

from __future__ import annotations

import torch

from merging.methods import MergeMethod, Param, TensorSet, layer_key, mergekit_value

DIAGNOSTICS = "gta"  # the ctx.diagnostics / merge report key all three methods share
RESCALES = ("l1", "inverse_density", "none")  # DARE's `rescale` knob, value 0 first
# mergekit leaves a masked tensor unscaled when either L1 norm is below this (rescaled_masked_tensor)
L1_EPS = 1e-7


def gta_params(alpha: float, normalize: bool, dare: bool = False) -> tuple[Param, ...]:
    rescale = (Param("rescale", 0, 0, 2, "DARE's survivors: 0 l1 (mergekit: each task vector keeps its L1 "
                     "norm), 1 inverse_density (the paper: divide by density), 2 none", kind=int,
                     per_layer=False, choices=RESCALES),) if dare else ()
    return (
        Param("alpha", alpha, 0.0, 2.0, "weight of the reasoner's task vector"),
        Param("weight_vlm", 1.0, 0.0, 2.0, "weight of the VLM's own task vector"),
        Param("density", 0.5, 0.01, 1.0, "fraction of each task vector kept"),
        Param("lam", 1.0, 0.0, 3.0, "scale of the merged task vector (recipes may still say lambda)",
              aliases=("lambda",)),
        Param("normalize", int(normalize), 0, 1, "1: divide by the summed weights (of agreeing models)",
              kind=bool, per_layer=False),
        Param("br2v", 0, 0, 1, "1: the BR2V reference code's semantics (unweighted sign election, divide by "
              "the count of agreeing models, no DARE rescale)", kind=bool, per_layer=False),
    ) + rescale


def magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top int(density * numel) entries by magnitude (mergekit `magnitude`, no rescale).

    Works in place on tau (the caller's own temporary). mergekit refuses k == 0; here a tiny
    tensor (e.g. a 1-D norm at low density) just keeps nothing.
    """
    if density >= 1:
        return tau
    k = int(density * tau.numel())
    if k <= 0:
        return tau.zero_()
    idx = torch.topk(tau.abs().flatten().float(), k, sorted=False).indices
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[idx] = True
    del idx
    return tau.mul_(mask.view(tau.shape))


def l1_norm(t: torch.Tensor) -> float:
    """||t||_1, summed in float32 at least (a bfloat16 sum would round the rescale factor)."""
    wide = t.dtype in (torch.float32, torch.float64)
    return float(torch.linalg.vector_norm(t, ord=1, dtype=None if wide else torch.float32))


def bernoulli(tau: torch.Tensor, density: float, gen: torch.Generator, rescale: str = "l1") -> torch.Tensor:
    """DARE: keep each entry with probability density, then rescale the survivors (in place):
    "l1" so the tensor keeps its L1 norm (mergekit), "inverse_density" by 1/density (the paper),
    "none" not at all.

    The mask is drawn on the CPU from a per-tensor generator so streamed, in-place, CPU and GPU
    merges of the same recipe give the same tensors.
    """
    if density >= 1:
        return tau
    keep = torch.rand(tau.shape, generator=gen, device="cpu") < density
    before = l1_norm(tau) if rescale == "l1" else 0.0
    tau.mul_(keep.to(tau.device))
    del keep
    if rescale == "inverse_density":
        return tau.div_(density)
    if rescale == "l1":
        after = l1_norm(tau)
        if before >= L1_EPS and after >= L1_EPS:  # mergekit: a (near) zero norm leaves the mask alone
            tau.mul_(before / after)
    return tau


def br2v_merge(t: TensorSet, p: dict, ctx, sparsify: str, consensus: bool) -> torch.Tensor:
    """The BR2V reference code's TIES/DARE (see the module docstring)."""
    gen = ctx.generator(t.name, device="cpu") if sparsify != "magnitude" else None
    taus = []
    for model in (t.vlm, t.reasoner):
        tau = model - t.base
        taus.append(magnitude(tau, p["density"]) if gen is None else bernoulli(tau, p["density"], gen, "none"))
    t0, t1 = taus
    w0, w1 = float(p["weight_vlm"]), float(p["alpha"])
    if not consensus:
        return t0.mul_(w0).add_(t1.mul_(w1)).mul_(p["lam"]).add_(t.base)
    positive = (t0 + t1) >= 0  # elected on the unweighted task vectors
    m0 = torch.where(positive, t0 > 0, t0 < 0)
    m1 = torch.where(positive, t1 > 0, t1 < 0)
    count = (m0.to(t0.dtype) + m1.to(t0.dtype)).clamp_(min=1.0)
    merged = t0.mul_(m0).mul_(w0).add_(t1.mul_(m1).mul_(w1)).div_(count)
    return merged.mul_(p["lam"]).add_(t.base)


def _tally(ctx, t: TensorSet, kept: tuple[int, int], agreed: tuple[int, int] | None) -> None:
    """Sum, per layer, the entries each task vector kept and those the sign election dropped
    (the merge report's kept fraction and sign conflicts; sums, so row blocks add up)."""
    e = ctx.diagnostics.of(DIAGNOSTICS).setdefault(layer_key(t.layer), {
        "entries": 0, "kept_vlm": 0, "kept_reasoner": 0, "conflicts": 0})
    e["entries"] += t.vlm.numel()
    e["kept_vlm"] += kept[0]
    e["kept_reasoner"] += kept[1]
    if agreed is not None:
        e["conflicts"] += kept[0] + kept[1] - agreed[0] - agreed[1]


def gta_merge(t: TensorSet, p: dict, ctx, sparsify: str, consensus: bool) -> torch.Tensor:
    if p.get("br2v", False):
        return br2v_merge(t, p, ctx, sparsify, consensus)
    # Every step after the two subtractions works in place on those temporaries: on an embedding
    # matrix each extra float32 copy is hundreds of MB.
    weights = (float(p["weight_vlm"]), float(p["alpha"]))
    gen = ctx.generator(t.name, device="cpu") if sparsify != "magnitude" else None  # VLM's mask, then reasoner's
    rescale = RESCALES[p.get("rescale", 0)]
    deltas = []
    for model, w in zip((t.vlm, t.reasoner), weights):
        tau = model - t.base
        tau = magnitude(tau, p["density"]) if gen is None else bernoulli(tau, p["density"], gen, rescale)
        deltas.append(tau.mul_(w))
    d0, d1 = deltas
    del deltas
    kept = (int(torch.count_nonzero(d0)), int(torch.count_nonzero(d1)))
    if consensus:
        positive = (d0 + d1) >= 0  # the elected sign: + where the weighted sum is >= 0
        m0 = torch.where(positive, d0 > 0, d0 < 0)  # sign(d) == elected sign (a zero never agrees)
        m1 = torch.where(positive, d1 > 0, d1 < 0)
        del positive
        # a kept entry off the elected sign is a lost conflict (opposite signs: exactly one loses)
        _tally(ctx, t, kept, (int(m0.sum()), int(m1.sum())))
        merged = d0.mul_(m0).add_(d1.mul_(m1))
        del d1
        if p["normalize"]:
            divisor = m0.to(merged.dtype).mul_(weights[0]).add_(m1.to(merged.dtype).mul_(weights[1]))
            del m0, m1
            divisor.masked_fill_(divisor.abs() < 1e-8, 1.0)
            merged.div_(divisor)
    else:
        _tally(ctx, t, kept, None)
        merged = d0.add_(d1)
        total = weights[0] + weights[1]
        if p["normalize"]:
            merged.div_(1.0 if abs(total) < 1e-8 else total)
    return merged.mul_(p["lam"]).add_(t.base)


def gta_diagnostics(d: dict, consensus: bool) -> dict:
    """The share of entries each task vector kept, and of kept entries lost to the sign vote."""
    per_layer = {}
    for k, e in d.items():
        row = {"kept_vlm": e["kept_vlm"] / max(e["entries"], 1), "kept_reasoner": e["kept_reasoner"] / max(e["entries"], 1)}
        if consensus:
            row["conflicts"] = e["conflicts"] / max(e["kept_vlm"] + e["kept_reasoner"], 1)
        per_layer[k] = row
    tot = {f: sum(e[f] for e in d.values()) for f in ("entries", "kept_vlm", "kept_reasoner", "conflicts")}
    out = {"per_layer": per_layer, "kept_vlm": tot["kept_vlm"] / max(tot["entries"], 1),
           "kept_reasoner": tot["kept_reasoner"] / max(tot["entries"], 1)}
    if consensus:
        out["conflicts"] = tot["conflicts"] / max(tot["kept_vlm"] + tot["kept_reasoner"], 1)
    return out


class GeneralizedTaskArithmetic(MergeMethod):
    """The shared core; a method subclasses it with its name, params, paper and these two settings."""

    needs_base = True
    scope = "tensor"
    sparsify: str = "magnitude"  # "magnitude" (top-k by |value|) or "bernoulli" (DARE's random drop)
    consensus: bool = True  # elect a sign per entry and keep only the agreeing deltas

    def merge_tensor(self, t: TensorSet, p: dict, ctx) -> torch.Tensor:
        return gta_merge(t, p, ctx, self.sparsify, self.consensus)

    def grid(self, num_layers: int) -> list[dict]:
        return [{"alpha": a, "density": d} for a in (0.5, 1.0, 1.5) for d in (0.3, 0.7)]

    def to_mergekit(self, recipe, knobs: dict) -> dict | None:
        # mergekit has the same three names; BR2V's reference semantics are not mergekit's, nor is
        # DARE's 1/density rescale (mergekit's `rescale` keeps the L1 norm)
        rescale = RESCALES[int(knobs.get("rescale", 0))]
        if int(knobs.get("br2v", 0)) or rescale == "inverse_density":
            return None
        weights = (mergekit_value(knobs["weight_vlm"]), mergekit_value(knobs["alpha"]))
        models = [{"model": m, "parameters": {"weight": w, "density": mergekit_value(knobs["density"])}}
                  for m, w in zip((recipe.vlm, recipe.reasoner), weights)]
        params = {"normalize": bool(int(knobs["normalize"])), "lambda": mergekit_value(knobs["lam"])}
        if self.sparsify == "bernoulli":
            params["rescale"] = rescale == "l1"
        return {"merge_method": self.name, "base_model": recipe.base, "models": models, "parameters": params}

    def mergekit_gap(self, knobs: dict) -> str:
        if int(knobs.get("br2v", 0)):
            return "the BR2V reference semantics (br2v: 1) are not mergekit's"
        return ("DARE's 1/density rescale (rescale: inverse_density) is not mergekit's, whose `rescale` keeps "
                "each task vector's L1 norm")

    def summarize_diagnostics(self, extra: dict) -> tuple[dict, list[str]]:
        if DIAGNOSTICS not in extra:
            return {}, []
        return {DIAGNOSTICS: gta_diagnostics(extra[DIAGNOSTICS], self.consensus)}, []

    def report_lines(self, diagnostics: dict) -> list[str]:
        gta = diagnostics.get(DIAGNOSTICS)
        if not gta:
            return []
        line = (f"kept {gta['kept_vlm']:.0%} of the VLM's and {gta['kept_reasoner']:.0%} of the reasoner's "
                "task-vector entries")
        if "conflicts" in gta:
            line += f"; {gta['conflicts']:.1%} of the kept entries lost the sign vote"
        return [line]
