"""The merge panel's knob controls: one pool of sliders and radios shows any method's knobs (its
number knobs on the sliders, its choice knobs on the radios), capped for the loaded model, with the
method's toggle and what the browser clamped."""

from __future__ import annotations

import inspect
import json

import gradio as gr

from merging import methods
from webapp.ui import recipes


def name_knobs(fn):
    """Name fn's pooled *knob_values in the API (Gradio reads the signature): knob1..knobN for the
    sliders (a method's number knobs in order), choice1..choiceM for the radios (its choice knobs),
    so clients can pass knob1=... without a hand-written parameter per control."""
    sig = inspect.signature(fn)
    fixed = [p for p in sig.parameters.values() if p.kind is not p.VAR_POSITIONAL]
    names = [f"knob{i + 1}" for i in range(recipes.SLIDERS)] + [f"choice{i + 1}" for i in range(recipes.CHOICES)]
    pooled = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    fn.__signature__ = sig.replace(parameters=fixed + pooled)
    return fn


def knob_updates(method: str, dims: dict | None = None, values: dict | None = None, prior: bool = False) -> list:
    """The pools' updates (sliders, then radios) that show `method`'s knobs at `values` (default: the
    method's defaults), sliders capped for this model (dims: num_layers, hidden_size)."""
    dims, values = dims or {}, values or {}
    hides = recipes.toggle_hides(method, prior)
    nums, chs = recipes.numeric_params(method), recipes.choice_params(method)
    ups = []
    for i in range(recipes.SLIDERS):
        if i < len(nums):
            p = nums[i]
            spec = recipes.slider_spec(p, dims.get("num_layers"), dims.get("hidden_size"))
            if p.name in values:
                spec["value"] = min(max(values[p.name], spec["minimum"]), spec["maximum"])
            ups.append(gr.update(visible=p.name not in hides, **spec))
        else:
            ups.append(gr.update(visible=False, value=None))
    for i in range(recipes.CHOICES):
        if i < len(chs):
            spec = recipes.radio_spec(chs[i])
            spec["value"] = int(values.get(chs[i].name, spec["value"]))
            ups.append(gr.update(visible=True, **spec))
        else:
            ups.append(gr.update(visible=False, value=None))
    return ups


def prior_updates(method: str, prior: bool) -> list:
    """Show the sliders the method's toggle leaves in this state (frank: beta with the prior, w_v without)."""
    if methods.get(method).toggle is None:
        return [gr.skip()] * recipes.SLIDERS
    hides = recipes.toggle_hides(method, prior)
    names = [p.name for p in recipes.numeric_params(method)]
    return [gr.update(visible=names[i] not in hides) if i < len(names) else gr.skip()
            for i in range(recipes.SLIDERS)]


def toggle_default(method: str) -> bool:
    m = methods.get(method)
    return bool(m.toggle) and bool(next(p.default for p in m.params if p.name == m.toggle.knob))


def toggle_update(method: str, **value) -> dict:
    """The toggle checkbox for this method: shown, with the method's own label, only when it has one."""
    toggle = methods.get(method).toggle
    if toggle is None:
        return gr.update(visible=False, **value)
    return gr.update(visible=True, label=toggle.label, info=toggle.info, **value)


def clamp_notes(method: str, typed: str, slider_values, dims: dict | None) -> list[str]:
    """Which slider the browser clamped: a typed value outside its range, and what it became."""
    try:
        raw = json.loads(typed) if typed and len(typed) < 4096 else {}
    except ValueError:
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    dims, notes = dims or {}, []
    for i, (p, v) in enumerate(zip(recipes.numeric_params(method), slider_values)):
        t = raw.get(str(i))
        if v is None or not isinstance(t, (int, float)) or isinstance(t, bool) or t == v:
            continue
        lo, hi, why = recipes.slider_range(p, dims.get("num_layers"), dims.get("hidden_size"))
        if t > hi:
            notes.append(f"`{p.name}`: {t:g} is above {why} ({hi:g}); clamped to {v:g}")
        elif t < lo:
            notes.append(f"`{p.name}`: {t:g} is below its minimum ({lo:g}); clamped to {v:g}")
    return notes


def describe(method: str) -> str:
    m = methods.get(method)
    base = "" if m.needs_base else " (does not need the base model)"
    return f"_{m.description or m.name}{base}_"
