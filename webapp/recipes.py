"""Turn the merge panel's controls into a validated recipe dict, and back (UI side)."""

from __future__ import annotations

import yaml

from merging import methods
from merging.errors import LabError

DEFAULT_METHOD = "task_arithmetic"
HIDDEN = {"frank": ("use_prior",)}  # knobs driven by other controls (frank: the prior checkbox)


def shown_params(method: str) -> list:
    hidden = HIDDEN.get(method, ())
    return [p for p in methods.get(method).params if p.name not in hidden]


POOL = max(len(shown_params(m)) for m in methods.names())  # sliders in the pool: the most any method shows


def slider_spec(p, num_layers: int | None = None) -> dict:
    """Slider settings for a Param: integer knobs with huge ranges are capped for usability."""
    hi = p.hi
    if p.integer and "layer" in p.name and num_layers:
        hi = min(hi, num_layers - 1)
    elif p.integer and hi > 256:
        hi = 256
    span = hi - p.lo
    step = 1 if p.integer else (0.01 if span <= 5 else 0.1)
    return {"minimum": p.lo, "maximum": hi, "step": step, "value": min(max(p.default, p.lo), hi),
            "label": p.name, "info": p.hint}


def build(triple: dict, method: str, knob_values, first=None, last=None, num_layers=None,
          prior: bool = False, advanced: str = "") -> dict:
    """The recipe dict for these controls, validated by merging.recipe (LabError when not valid)."""
    from merging.recipe import from_dict, parse_yaml

    m = methods.get(method)
    params = {}
    for p, v in zip(shown_params(method), knob_values):
        if v is None:
            continue
        params[p.name] = int(round(float(v))) if p.integer else round(float(v), 6)
    if method == "frank":
        if prior:
            params["use_prior"] = 1
            params.pop("w_v", None)
        else:
            params.pop("beta", None)
    if advanced and advanced.strip():
        # The hardened reader: no anchors/aliases, bounded size and nesting (an alias bomb here
        # would stall the shared worker for every user).
        extra = parse_yaml(advanced, "per-layer values")
        if not isinstance(extra, dict):
            raise LabError("per-layer values must be a mapping, e.g.  alpha: [0.0, 0.2, 0.4]")
        params.update(extra)
    d = {"vlm": triple["vlm"], "reasoner": triple["reasoner"], "method": m.name, "parameters": params}
    if triple.get("base"):
        d["base"] = triple["base"]
    if first is not None and last is not None and num_layers:
        first, last = int(first), min(int(last), num_layers - 1)
        if first > last:
            raise LabError(f"layer range: the first layer ({first}) is after the last ({last})")
        if (first, last) != (0, num_layers - 1):
            d["layers"] = [first, last]
    return from_dict(d).to_dict()


def to_yaml(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)
