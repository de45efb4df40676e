"""Per-layer knob resolution: a scalar, a per-layer list, or a gradient across layers.

A knob value in `parameters:` may be
- a number: the same value at every layer;
- a list of length num_layers: one value per decoder layer;
- a list of length 2 .. num_layers-1: a gradient, interpolated linearly like mergekit's
  gradients: layer i sits at fraction t = i / (num_layers - 1) of the anchor list.
Any other list length is a LabError naming the knob, its length and what is allowed.

Tensors outside the decoder layers (final norm, embeddings, lm_head) use the value at the last
layer: the final norm sits after the last block, and one fixed rule is easier to predict than
a per-tensor special case.
"""

from __future__ import annotations

from merging import methods
from merging.errors import LabError


def _method(method):
    return methods.get(method) if isinstance(method, str) else method


def _allowed(num_layers: int) -> str:
    if num_layers <= 2:
        return f"a number or a list of {num_layers} (one per layer)"
    return f"a number, a list of {num_layers} (one per layer) or a gradient of 2 to {num_layers - 1} anchors"


def check_length(name: str, value, num_layers: int) -> None:
    if not isinstance(value, list):
        return
    n = len(value)
    if n == num_layers or 2 <= n <= num_layers - 1:
        return
    raise LabError(f"parameter {name!r} is a list of length {n}; the model has {num_layers} layers, "
                   f"so give {_allowed(num_layers)}")


def interpolate(anchors: list, layer: int, num_layers: int) -> float:
    """mergekit's gradient rule: linear interpolation at t = layer / (num_layers - 1)."""
    if len(anchors) == 1:
        return float(anchors[0])
    t = layer / (num_layers - 1) if num_layers > 1 else 0.0
    scaled = t * (len(anchors) - 1)
    i0 = int(scaled)
    if i0 >= len(anchors) - 1:
        return float(anchors[-1])
    frac = scaled - i0
    return float(anchors[i0]) * (1 - frac) + float(anchors[i0 + 1]) * frac


def resolve(method, knobs: dict, layer: int | None, num_layers: int) -> dict[str, float | int | bool]:
    """The method's knob values at one layer (None: a tensor outside the decoder layers), each as its
    Param's kind: float, int (rounded after interpolation, so a gradient of ranks stays whole) or
    bool (on at >= 0.5). A knob the method does not declare stays a float.

    `knobs` is usually recipe.knobs() (defaults overlaid with the recipe's parameters).
    """
    m = _method(method)
    at = num_layers - 1 if layer is None else layer
    out: dict[str, float | int | bool] = {}
    specs = {p.name: p for p in m.params}
    for name, value in {**m.defaults(), **knobs}.items():
        if isinstance(value, list):
            check_length(name, value, num_layers)
            v = float(value[at]) if len(value) == num_layers else interpolate(value, at, num_layers)
        else:
            v = float(value)
        spec = specs.get(name)
        out[name] = spec.typed(v) if spec is not None else v
    return out


def validate_lengths(recipe, num_layers: int) -> None:
    """Check every list-valued knob and the `layers` range against the model; before any work."""
    for name, value in (recipe.parameters or {}).items():
        check_length(name, value, num_layers)
    if recipe.layers is not None:
        start, end = recipe.layers
        if end >= num_layers:
            raise LabError(f"'layers' [{start}, {end}] is out of range: the model has {num_layers} "
                           f"decoder layers (0 to {num_layers - 1})")
