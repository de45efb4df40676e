"""The knobs the auto-tuner searches for one method, and how a trial's numbers become recipe knobs.

[choice] The searched knobs are the ones the method's leaderboard grid varies (MergeMethod.grid),
each over its Param range: the method's author named them as the ones worth tuning, and the
tuned point then competes with the grid's best on the same knobs. A float knob that may vary per
layer is searched as a schedule: a start and an end value, the recipe's 2-anchor gradient
(merging.params: linear from the first to the last decoder layer); start == end is the constant.
An int knob is searched over its whole numbers, a bool knob over 0 and 1; a knob naming a decoder
layer (Param.layer_index) only over the model's layers. Where the method has a toggle (frank's
use_prior) among the searched knobs, it is drawn first and the knobs that mean nothing in its state
are not drawn at all (a conditional space: no trial is spent on a combination the method refuses).
"""

from __future__ import annotations

from analysis.knob_figures import describe as describe
from merging import methods
from merging.errors import LabError


def searched(method: str, num_layers: int) -> list:
    """The Params the tuner varies, in the method's order."""
    m = methods.get(method)
    named = {k for point in m.grid(num_layers) for k in point}
    params = [p for p in m.params if p.name in named]
    if not params:
        raise LabError(f"method {method!r} names no knobs to tune (its leaderboard grid varies none)")
    return params


def _space(method: str, num_layers: int) -> tuple[list, object]:
    """(the searched Params, the method's toggle when it is one of them, else None)."""
    params, toggle = searched(method, num_layers), methods.get(method).toggle
    return params, toggle if toggle and any(p.name == toggle.knob for p in params) else None


def _drawn(params: list, toggle, on: bool | None) -> list:
    """The searched Params besides the toggle that mean something in its state (all, without one)."""
    if toggle is None:
        return params
    hidden = {toggle.knob, *toggle.hides(on)}
    return [p for p in params if p.name not in hidden]


def is_schedule(p, num_layers: int) -> bool:
    return p.per_layer and p.kind is float and num_layers >= 3  # a 2-anchor gradient needs 3+ layers


def suggest(trial, method: str, num_layers: int) -> dict:
    """One trial's knobs, as recipe parameters (a schedule as [start, end]); the toggle, if any, first."""
    params, toggle = _space(method, num_layers)
    knobs: dict = {}
    on = None
    if toggle:
        on = bool(trial.suggest_int(toggle.knob, 0, 1))
        knobs[toggle.knob] = int(on)
    for p in _drawn(params, toggle, on):
        if is_schedule(p, num_layers):
            start = trial.suggest_float(f"{p.name}_start", float(p.lo), float(p.hi))
            end = trial.suggest_float(f"{p.name}_end", float(p.lo), float(p.hi))
            knobs[p.name] = [round(start, 4), round(end, 4)]
        elif p.kind is float:
            knobs[p.name] = round(trial.suggest_float(p.name, float(p.lo), float(p.hi)), 4)
        else:
            lo, hi = p.bounds(num_layers)
            knobs[p.name] = trial.suggest_int(p.name, int(lo), int(hi))
    return knobs


def point_params(method: str, num_layers: int, knobs: dict) -> dict:
    """The trial parameters of one point given as recipe knobs (the rest at the method's defaults);
    a constant per-layer knob is a schedule whose start equals its end."""
    params, toggle = _space(method, num_layers)
    values = {**methods.get(method).defaults(), **knobs}
    out: dict = {}
    on = None
    if toggle:
        on = bool(values[toggle.knob])
        out[toggle.knob] = int(on)
    for p in _drawn(params, toggle, on):
        if is_schedule(p, num_layers):
            out[f"{p.name}_start"] = out[f"{p.name}_end"] = float(values[p.name])
        else:
            out[p.name] = float(values[p.name]) if p.kind is float else int(values[p.name])
    return out


def defaults_params(method: str, num_layers: int) -> dict:
    """The trial parameters of the method's defaults."""
    return point_params(method, num_layers, {})


def start_points(method: str, num_layers: int) -> list[dict]:
    """[choice] The trials a new study starts with: the defaults, then each point of the leaderboard's
    grid (a warm start: the tuner's front on dev is then never worse than the grid's best)."""
    out = []
    for knobs in [{}] + methods.get(method).grid(num_layers):
        params = point_params(method, num_layers, knobs)
        if params not in out:
            out.append(params)
    return out
