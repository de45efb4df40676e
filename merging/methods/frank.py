"""`frank` (FRANK, arXiv 2505.16151; no public code). Scope: one decoder block at a time.

With task vectors flattened over the whole block l (every tensor of it):
  W = W_0 + lam_v(l) tau_v + lam_r(l) tau_r,
  lam_t(l) = w_t ||tau_t||^2 / (w_v ||tau_v||^2 + w_r ||tau_r||^2),   w_r = 1 - w_v.
The modality prior w_v(l) comes from one of
- `w_v`: a number or a per-layer list / gradient (e.g. from the attention-decay analysis);
  the default 0.5 (w_v = w_r) is exactly "no prior": the plain norm ratio;
- `use_prior: 1` with `beta`, in one of two forms (`prior_form`), from the fitted visual-attention
  decay a_l = C exp(-beta l) (l from 0; paper Eq. 15 on the closed form of Eq. 13):
  0 "clipped" [choice, the default]: w_v(l) = min(1, exp(-beta l)) = a_l / a_0, 1 at layer 0 and
    falling with depth as the attention does; a negative beta (attention rising) gives 1;
  1 "normalized": w_v(l) = exp(-beta l) / sum_j exp(-beta j) over the model's L layers, the
    prior normalised over layers; it is ~1/L in every layer at small beta, so it hands even the
    first block mostly to the reasoner.
Giving both `w_v` and `use_prior: 1` is an error. When the denominator is 0 the block keeps the
VLM's. Tensors outside the decoder layers (final norm, shared embedding rows) are each merged
as a one-tensor block with the last layer's weights.
"""

from __future__ import annotations

import math

import torch

from merging.errors import LabError
from merging.methods import MergeMethod, Paper, Param, TensorSet, Toggle, layer_key, register

PRIOR_FORMS = ("clipped", "normalized")  # the `prior_form` knob, value 0 first
DEFAULT_BETA = 0.1


def prior_w_v(beta: float, layer: int, num_layers: int = 0, form: str = "clipped") -> float:
    """FRANK's modality prior at decoder layer `layer`, in [0, 1]: "clipped" min(1, exp(-beta l)),
    "normalized" exp(-beta l) / sum_j exp(-beta j) over num_layers layers."""
    if form == "normalized":
        # shifted by the largest exponent so no term overflows, whatever the sign of beta
        top = max(-beta * j for j in (0, num_layers - 1))
        total = sum(math.exp(-beta * j - top) for j in range(num_layers))
        return math.exp(-beta * layer - top) / total
    return math.exp(-beta * layer) if beta * layer > 0 else 1.0


def prior(beta: float, num_layers: int, form: str = "clipped") -> list[float]:
    """w_v(l) for every layer (what the attention-decay analysis shows next to its fit)."""
    return [prior_w_v(beta, layer, num_layers, form) for layer in range(num_layers)]


@register
class Frank(MergeMethod):
    name = "frank"
    needs_base = True
    scope = "layer"
    description = "Per-block weights from the task vectors' squared norms, optionally with an attention prior."
    params = (
        Param("w_v", 0.5, 0.0, 1.0, "prior weight of the VLM per layer (w_r = 1 - w_v); 0.5 = no prior"),
        Param("use_prior", 0, 0, 1, "1: w_v from the exponential prior with beta", kind=bool, per_layer=False),
        Param("beta", DEFAULT_BETA, -10.0, 10.0, "decay rate of the visual attention per layer (fit it in the "
              "attention analysis); w_v(l) = exp(-beta l)", per_layer=False),
        Param("prior_form", 0, 0, 1, "the prior's form: 0 clipped, min(1, exp(-beta l)) = a_l / a_0; 1 normalized "
              "over layers, exp(-beta l) / sum_j exp(-beta j)", kind=int, per_layer=False, choices=PRIOR_FORMS),
    )
    paper = Paper("FRANK", "FRANK, 2025", "https://arxiv.org/abs/2505.16151")
    # The app's prior checkbox is use_prior; with it on w_v means nothing, with it off beta does not.
    toggle = Toggle("use_prior", "Use the attention-decay prior (beta)",
                    "FRANK: weight the VLM more in early layers, where images get most attention",
                    hides_when_on=("w_v",), hides_when_off=("beta", "prior_form"))

    def grid(self, num_layers: int) -> list[dict]:
        return [{"w_v": w} for w in (0.3, 0.5, 0.7)] + [{"use_prior": 1, "beta": b} for b in (0.1, 0.3, 1.0)]

    def variants(self, num_layers: int) -> list[tuple[str, dict]]:
        # both forms of the prior, at the same beta, each a leaderboard row of its own
        return [(f"prior {form}", {"use_prior": 1, "beta": DEFAULT_BETA, "prior_form": i})
                for i, form in enumerate(PRIOR_FORMS)]

    def attention_knobs(self, beta: float) -> dict:
        return {"use_prior": 1, "beta": beta}

    def validate(self, params: dict) -> None:
        if "w_v" in params and params.get("use_prior", 0):
            raise LabError("frank: give either 'w_v' (explicit prior) or 'use_prior: 1' with 'beta', not both")
        if "prior_form" in params and not params.get("use_prior", 0):
            raise LabError("frank: 'prior_form' shapes the prior of 'use_prior: 1'; add it or drop 'prior_form'")

    def merge_layer(self, layer, sets: dict[str, TensorSet], p: dict, ctx) -> dict[str, torch.Tensor]:
        at = ctx.num_layers - 1 if layer is None else layer
        form = PRIOR_FORMS[p.get("prior_form", 0)]
        w_v = prior_w_v(p["beta"], at, ctx.num_layers, form) if p["use_prior"] else float(p["w_v"])
        w_r = 1.0 - w_v
        tau_v = {n: t.vlm - t.base for n, t in sets.items()}
        tau_r = {n: t.reasoner - t.base for n, t in sets.items()}
        n_v = sum(float(x.double().square().sum()) for x in tau_v.values())
        n_r = sum(float(x.double().square().sum()) for x in tau_r.values())
        den = w_v * n_v + w_r * n_r
        if den <= 0:
            return {}
        lam_v, lam_r = w_v * n_v / den, w_r * n_r / den
        ctx.diagnostics.of(self.name)[layer] = {"w_v": w_v, "lam_v": lam_v, "lam_r": lam_r}
        return {n: t.base + lam_v * tau_v[n] + lam_r * tau_r[n] for n, t in sets.items()}

    # ---- diagnostics: ctx.diagnostics.of(name) is {layer or None: {"w_v", "lam_v", "lam_r"}}
    def summarize_diagnostics(self, extra: dict) -> tuple[dict, list[str]]:
        if self.name not in extra:
            return {}, []
        return {self.name: {layer_key(k): v for k, v in extra[self.name].items()}}, []

    def selection_details(self, extra: dict) -> str:
        if self.name not in extra:
            return ""
        by_layer = sorted(extra[self.name].items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        w = [v["w_v"] for _, v in by_layer]
        return f"w_v {w[0]:.2f} -> {w[-1]:.2f}" if w else ""

    def report_lines(self, diagnostics: dict) -> list[str]:
        fr = diagnostics.get(self.name)
        if not fr:
            return []
        w = [v["w_v"] for v in fr.values()]
        return [f"{self.name} w_v from {w[0]:.2f} (first layer) to {w[-1]:.2f} (last)"]

    def layer_note(self, diagnostics: dict, layer: str) -> str:
        fr = diagnostics.get(self.name, {}).get(layer)
        return f"; {self.name} w_v = {fr['w_v']:.2f}" if fr else ""
