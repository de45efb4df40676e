"""DRIFT (arXiv 2510.15050): reasoning injected through the gradient during a short fine-tune.

Not a merge: the prior D = W_reasoner - W_vlm of the attention and MLP projections (weights and
biases, vision modules never) is kept once on the CPU, and a hook on each such parameter of the
VLM's language model rewrites its gradient g (docs/METHODS.md, DRIFT):

  absolute:         g - a * D'   with D' = D * ||W_v|| / ||D|| (the reference's default,
                    normalize_delta_to_param) or [option normalize_delta: false] the raw D' = D
  gradnorm:         g - a * ||g|| * D / ||D||
  adaptive_cosine:  g - a * ((cos(g, D) + 1) / 2) * ||g|| * D / ||D||      (default)

A descent step on the rewritten gradient moves the weights toward the reasoner. The rescale of D
matters only in absolute mode: the other two use D's direction alone. The reference
code skips names that do not match, so with newer transformers layouts zero hooks attach and
training is silently plain; here every prior tensor must map to a parameter, or it is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.errors import LabError
from merging.inplace import map_parameters
from merging.layout import split_canonical

MODES = ("absolute", "gradnorm", "adaptive_cosine")
PRIOR_NAMES = re.compile(r"^layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)$")
DRIFT_KEYS = {"steps": (1, 100_000), "lr": (1e-7, 1.0), "alpha": (0.0, 100.0), "batch_size": (1, 1024),
              "examples": (1, 1_000_000), "seed": (0, 2**31), "replay": (0.0, 0.9), "mode": None,
              "normalize_delta": None, "data": None, "layers": None}
# data: a JSONL of image + question + answer (merging.finetune); None is the toy scenes, for the bundled
# family only. examples caps how many items are used. replay: the share of the toy examples that are
# perception questions (the VLM's own skill, replayed so that a fine-tune is not on visual math alone).
# layers: [a, b], the decoder layers a..b (inclusive) that train, the rest of the model frozen; absent,
# the whole language model trains (the paper's setting). Not in DRIFT_DEFAULTS, so that a recipe without
# it names the same run as before the option existed.
DRIFT_DEFAULTS = {"steps": 60, "lr": 3e-4, "alpha": 1.0, "batch_size": 8, "examples": 256, "seed": 0,
                  "replay": 0.0, "mode": "adaptive_cosine", "normalize_delta": True, "data": None}
_EPS = 1e-12


@dataclass(frozen=True)
class DriftResult:
    """A finished fine-tune (DRIFT, or the plain one at alpha 0): the Hugging Face folder it wrote
    and what it was trained from. merging.finetune.run_drift makes it, the `drift` command prints
    it, the app's worker answers its drift job from it. reused: an earlier run's folder for the
    same settings, taken as it is (then no losses and 0 seconds)."""

    folder: str
    vlm: str
    reasoner: str
    settings: dict = field(hash=False)  # drift_settings(): steps, lr, alpha, mode, batch_size, data, ...
    losses: tuple[float, ...] = ()  # one per training step
    seconds: float = 0.0  # training and saving
    reused: bool = False

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def adjust_gradient(g: torch.Tensor, d: torch.Tensor, mode: str, alpha: float, d_norm: float | None = None) -> torch.Tensor:
    """The DRIFT rewrite of one gradient g by its prior d (same shape)."""
    if mode == "absolute":
        return g - alpha * d
    dn = float(d.norm()) if d_norm is None else d_norm
    if dn == 0.0:
        return g  # the reasoner equals the VLM here: nothing to steer toward
    gn = g.norm()
    unit = d / dn
    if mode == "gradnorm":
        return g - alpha * gn * unit
    if mode == "adaptive_cosine":
        cos = (g * d).sum() / (gn * dn + _EPS)
        return g - alpha * ((cos + 1) / 2) * gn * unit
    raise LabError(f"unknown DRIFT mode {mode!r}; choose one of {', '.join(MODES)}")


def compute_prior(vlm_ref: str, reasoner_ref: str, progress=None, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """canonical name -> D = W_r - W_v (float32, CPU) for every attention/MLP projection (of LAYERS only)."""
    report = check_triple(vlm_ref, reasoner_ref)
    report.raise_if_incompatible()
    lv, lr = report.layouts["vlm"], report.layouts["reasoner"]
    names = [c for c in lv.lm if PRIOR_NAMES.match(c) and in_layers(c, layers)]
    if not names:
        raise LabError(f"DRIFT prior: no attention/MLP projections found in {vlm_ref}")
    prior = {}
    with Checkpoint.open(vlm_ref) as cv, Checkpoint.open(reasoner_ref) as cr:
        for i, c in enumerate(names):
            if c not in lr.lm:
                raise LabError(f"DRIFT prior: {c} of the VLM has no match in the reasoner {reasoner_ref}")
            prior[c] = cr.get(lr.lm[c]).float() - cv.get(lv.lm[c]).float()
            if progress:
                progress(i + 1, len(names), f"prior {c}")
    return prior


def attach_hooks(model, prior: dict[str, torch.Tensor], mode: str = "adaptive_cosine", alpha: float = 1.0,
                 normalize_delta: bool = True) -> list:
    """Register one gradient hook per prior tensor on the loaded model. Returns the handles
    (call .remove() on each to detach). Raises LabError if any prior tensor has no parameter.
    normalize_delta: in absolute mode, rescale each D to the norm of its parameter (as loaded)."""
    if mode not in MODES:
        raise LabError(f"unknown DRIFT mode {mode!r}; choose one of {', '.join(MODES)}")
    bad = [c for c in prior if not PRIOR_NAMES.match(c)]
    if bad:
        raise LabError(f"DRIFT prior tensor {bad[0]!r} is not an attention/MLP projection of a decoder layer")
    names = map_parameters(model, {c: tuple(d.shape) for c, d in prior.items()})
    params = dict(model.named_parameters())
    handles = []
    for c, pname in names.items():
        p = params[pname]
        if not p.requires_grad:
            raise LabError(f"DRIFT: parameter {pname} is frozen; the prior targets the language model only")
        # One copy per device: on the CPU this is the prior itself (no extra memory).
        d = prior[c].to(device=p.device, dtype=torch.float32)
        d_norm = float(d.norm())
        if mode == "absolute" and normalize_delta and d_norm > 0:
            d = d * (float(p.detach().float().norm()) / d_norm)  # a new tensor: the prior stays raw
            d_norm = float(d.norm())

        def hook(g, d=d, d_norm=d_norm):
            return adjust_gradient(g.float(), d, mode, alpha, d_norm).to(g.dtype)

        handles.append(p.register_hook(hook))
    return handles


def drift_settings(section: dict | None) -> dict:
    """The recipe's `drift:` section over the defaults, validated."""
    section = section or {}
    unknown = [k for k in section if k not in DRIFT_KEYS]
    if unknown:
        raise LabError(f"unknown drift setting {unknown[0]!r}; allowed: {', '.join(DRIFT_KEYS)}")
    out = {**DRIFT_DEFAULTS, **section}
    if out["mode"] not in MODES:
        raise LabError(f"drift mode must be one of {', '.join(MODES)}, got {out['mode']!r}")
    if not isinstance(out["normalize_delta"], bool):
        raise LabError(f"drift normalize_delta must be true or false, got {out['normalize_delta']!r}")
    if out["data"] is not None and not (isinstance(out["data"], str) and out["data"].strip()):
        raise LabError(f"drift data must be the path of a .jsonl file, got {out['data']!r}")
    for k, rng in DRIFT_KEYS.items():
        if rng is None:
            continue
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (rng[0] <= v <= rng[1]):
            raise LabError(f"drift {k} = {v!r} is out of range; allowed {rng[0]} to {rng[1]}")
        if k in ("steps", "batch_size", "examples", "seed") and int(v) != v:
            raise LabError(f"drift {k} must be a whole number, got {v!r}")
    if "layers" in out:
        out["layers"] = layer_range(out["layers"])
    if out["replay"] and out["data"] is not None:
        raise LabError("drift replay mixes perception questions into the toy scenes only; with a data file, "
                       "put the items to replay into the file itself")
    return out


def layer_range(value) -> list[int] | None:
    """The `layers` setting: None, or [a, b] with 0 <= a <= b (checked against the model when it trains)."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in value) or not 0 <= value[0] <= value[1]):
        raise LabError(f"drift layers must be [first, last] decoder layers (whole numbers, first <= last), got {value!r}")
    return [int(value[0]), int(value[1])]


def in_layers(canonical: str, layers: list[int] | None) -> bool:
    """Whether a canonical language-model tensor trains: every one without a range, else those of the
    decoder layers in it."""
    if layers is None:
        return True
    layer, _ = split_canonical(canonical)
    return layer is not None and layers[0] <= layer <= layers[1]
