"""Turn the merge panel's controls into a validated recipe dict, and back (UI side).

The panel shows a method's knobs from two pools of controls: sliders for numbers and radios for
choices (integer knobs with a few labelled values, e.g. ties' `normalize` or ip_merging's `svd`).
"""

from __future__ import annotations

from merging import methods
from merging.errors import LabError
from merging.recipe import from_dict, parse_yaml

DEFAULT_METHOD = methods.default_method().name
# Labels of the choice knobs' values, by knob name (a choice: an integer knob spanning at most 4 values).
CHOICE_LABELS = {
    "normalize": ("0 · off: a plain weighted sum", "1 · divide by the summed weights"),
    "br2v": ("0 · off: mergekit's semantics", "1 · the BR2V reference code's semantics"),
    "svd": ("0 · auto", "1 · exact", "2 · randomized"),
    "similarity": ("0 · paired singular vectors (paper)", "1 · principal angles"),
    "use_prior": ("0 · off: w_v", "1 · on: exp(-beta · layer)"),
    "rescale": ("0 · l1: keep each task vector's L1 norm (mergekit)", "1 · inverse_density: 1/density (DARE paper)",
                "2 · none"),
    "use_threshold": ("0 · the top fraction of each layer", "1 · a threshold on the score (paper)"),
    "prior_form": ("0 · clipped: a_l / a_0", "1 · normalized over the layers"),
}
CAP = 256  # largest slider for an integer knob with a huge range when the model's size is not known


def shown_params(method: str) -> list:
    """The knobs shown in the pools: all but the method's toggle (a checkbox of its own)."""
    m = methods.get(method)
    return [p for p in m.params if m.toggle is None or p.name != m.toggle.knob]


def toggle_hides(method: str, on: bool) -> tuple[str, ...]:
    """The knobs the method's toggle hides in this state (none for a method without a toggle)."""
    toggle = methods.get(method).toggle
    return toggle.hides(bool(on)) if toggle else ()


def is_choice(p) -> bool:
    return bool(p.integer) and p.hi - p.lo <= 3


def choices(p) -> list[tuple[str, int]]:
    """(label, value) of a choice knob's values."""
    labels = CHOICE_LABELS.get(p.name) or tuple(f"{i} · {c}" for i, c in enumerate(p.choices))
    values = range(int(p.lo), int(p.hi) + 1)
    return [(labels[i] if i < len(labels) else str(v), v) for i, v in enumerate(values)]


def numeric_params(method: str) -> list:
    return [p for p in shown_params(method) if not is_choice(p)]


def choice_params(method: str) -> list:
    return [p for p in shown_params(method) if is_choice(p)]


SLIDERS = max(len(numeric_params(m)) for m in methods.names())  # sliders in the pool: the most any method shows
CHOICES = max(len(choice_params(m)) for m in methods.names())  # radios in the pool


def in_shown_order(method: str, slider_values, radio_values) -> list:
    """The pooled controls' values in shown_params(method) order (what build() takes)."""
    sliders, radios = iter(slider_values), iter(radio_values)
    return [next(radios) if is_choice(p) else next(sliders) for p in shown_params(method)]


def slider_range(p, num_layers: int | None = None, hidden_size: int | None = None) -> tuple[float, float, str]:
    """(lo, hi, why hi) of a knob's slider: layer knobs end at the last layer, integer knobs with
    huge ranges (ip_merging's rank) at the model's hidden size, else at CAP when it is not known."""
    hi, why = p.hi, "its maximum"
    if p.layer_index and num_layers:
        if p.bounds(num_layers)[1] < hi:
            hi, why = p.bounds(num_layers)[1], "this model's last layer"
    elif p.integer and hi > CAP:
        hi, why = (hidden_size, "this model's hidden size") if hidden_size else (CAP, "the slider's maximum")
        hi = min(hi, p.hi)
    return p.lo, hi, why


def slider_spec(p, num_layers: int | None = None, hidden_size: int | None = None) -> dict:
    """Slider settings for a Param."""
    lo, hi, _ = slider_range(p, num_layers, hidden_size)
    span = hi - lo
    step = 1 if p.integer else (0.01 if span <= 5 else 0.1)
    return {"minimum": lo, "maximum": hi, "step": step, "value": min(max(p.default, lo), hi),
            "label": p.name, "info": p.hint}


def radio_spec(p) -> dict:
    return {"choices": choices(p), "value": int(p.default), "label": p.name, "info": p.hint}


def build(triple: dict, method: str, knob_values, first=None, last=None, num_layers=None,
          prior: bool = False, advanced: str = "") -> dict:
    """The recipe dict for these controls, validated by merging.recipe (LabError when not valid).
    knob_values: the method's shown knobs in shown_params order (see in_shown_order)."""
    m = methods.get(method)
    params = {}
    for p, v in zip(shown_params(method), knob_values):
        if v is None:
            continue
        params[p.name] = int(round(float(v))) if p.integer else round(float(v), 6)
    if m.toggle is not None:  # the checkbox sets its knob; the knobs it hides mean nothing
        if prior:
            params[m.toggle.knob] = 1
        for name in m.toggle.hides(bool(prior)):
            params.pop(name, None)
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
