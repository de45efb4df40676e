"""The lab's state as a page URL's query string, and back (pure: no Gradio, no files read).

    ?preset=toy-family&method=ip_merging&threshold=0.4&top_fraction=0.5&rank=32&...&tab=changes

Keys: `preset` (a preset's slug or label; absent: the bundled toy family), or `vlm`, `reasoner` and
`base` (folders inside the app's --models-root), `method`, the method's knobs by name (frank's prior
as `use_prior`), `layers` (FIRST-LAST, absent: all), `per_layer` (the per-layer box's YAML, e.g. a tuned
schedule `{alpha: [1.2, 1.1]}`) and `tab` (chat, drift, an analysis' name, evaluate or leaderboard);
Gradio's own parameters (`__theme`) are left alone.
parse() never raises: each parameter it cannot use is named in a message and left at its default.
The page writes the URL in the browser (encoder_js(), the same format as encode()).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from urllib.parse import urlencode

from analysis import analyses
from merging import methods
from merging.errors import LabError
from webapp import presets
from webapp.ui import recipes

ROLES = ("vlm", "reasoner", "base")
RESERVED = ("preset", *ROLES, "method", "layers", "per_layer", "tab")
PAGES = ("evaluate", "leaderboard")  # main tabs of their own (ids "tab-<name>")
TABS = ("chat", "drift", *analyses.names(), *PAGES)  # drift: the chat tab with the DRIFT panel open
MAX_VALUE = 300  # characters of one parameter's value
MAX_KEYS = 40


@dataclass(frozen=True)
class LabState:
    preset: str = presets.DEFAULT  # a preset's label, or presets.CUSTOM (then vlm, reasoner, base)
    vlm: str = ""
    reasoner: str = ""
    base: str = ""
    method: str = recipes.DEFAULT_METHOD
    knobs: dict = field(default_factory=dict)  # knob name -> value; a missing knob is at its default
    layers: tuple[int, int] | None = None  # inclusive decoder-layer range; None: all layers
    per_layer: str = ""  # the per-layer box's YAML (knob -> one value per layer, or a gradient's anchors)
    tab: str = "chat"

    def knob(self, name: str):
        """A knob's value: as set, else the method's default."""
        return self.knobs[name] if name in self.knobs else methods.get(self.method).param(name).default

    @property
    def prior(self) -> bool:
        """The method's toggle (frank's prior checkbox) is on."""
        toggle = methods.get(self.method).toggle
        return toggle is not None and bool(self.knob(toggle.knob))


def slug(label: str) -> str:
    """A preset's short name in URLs: "Toy family (bundled, CPU, seconds)" -> "toy-family"."""
    return re.sub(r"[^a-z0-9]+", "-", label.split(" (")[0].lower()).strip("-")


SLUGS = {slug(label): label for label in presets.labels()}


def show(value) -> str:
    """A user-given value inside a message: short, as inline code (no links, no markup)."""
    text = re.sub(r"[`\s]+", " ", str(value)).strip()
    return f"`{text[:40]}{'…' if len(text) > 40 else ''}`" if text else "(empty)"


def _fmt(x) -> str:
    """A number as the URL writes it (the browser's encoder too): at most 6 decimals, no trailing .0."""
    if isinstance(x, float):
        text = repr(round(x, 6))
        return text[:-2] if text.endswith(".0") else text
    return str(x)


def _key(key: str) -> str:
    return show(key).strip("`")


def _preset(query: Mapping, models_root: str | None, notes: list[str]) -> dict:
    """preset / vlm / reasoner / base -> the LabState fields for the triple."""
    given = [k for k in ROLES if k in query]
    label = None
    if "preset" in query:
        v = query["preset"]
        label = SLUGS.get(v.strip().lower()) or (v if v in presets.labels() else None)
        if label is None:
            notes.append(f"`preset`: {show(v)} is not a preset here; using the bundled toy family")
            return {}
        if given and label != presets.CUSTOM:
            notes.append(f"{', '.join(f'`{k}`' for k in given)}: ignored, the link names a preset")
            return {"preset": label}
    if not given:
        return {"preset": label} if label else {}
    if len(given) < len(ROLES):
        notes.append("`vlm`, `reasoner`, `base`: a custom triple needs all three; using the bundled toy family")
        return {}
    if models_root is None:
        notes.append("`vlm`, `reasoner`, `base`: model folders in a link are used only when the app runs "
                     "with --models-root; using the bundled toy family")
        return {}
    refs = {k: query[k].strip() for k in ROLES}
    bad = [m for k in ROLES if (m := model_path_problem(k, refs[k], models_root))]
    if bad:
        notes += [f"{m}; using the bundled toy family" for m in bad]
        return {}
    return {"preset": presets.CUSTOM, **refs}


def model_path_problem(key: str, ref: str, models_root: str) -> str | None:
    """Why a model path from a link is not used (None: it may be; the models panel then checks
    that it exists and that no link inside the root leads out of it)."""
    if not ref:
        return f"`{key}`: empty"
    if any(ord(c) < 32 for c in ref):
        return f"`{key}`: control characters in {show(ref)}"
    p = PurePosixPath(ref)
    root = PurePosixPath(models_root)
    if ".." in p.parts or (p.is_absolute() and root not in p.parents):
        return f"`{key}`: {show(ref)} is outside the models root"
    return None


def _number(text: str):
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(text)
    return x


def _knob(p, text: str, notes: list[str]):
    """A knob's value from a link, or None (noted) when it is not one."""
    default = f"using the default {_fmt(p.default)}"
    try:
        x = _number(text)
    except ValueError:
        notes.append(f"`{p.name}`: {show(text)} is not a number; {default}")
        return None
    if p.integer and not x.is_integer():
        notes.append(f"`{p.name}`: {show(text)} is not a whole number; {default}")
        return None
    if not p.lo <= x <= p.hi:
        notes.append(f"`{p.name}`: {show(text)} is outside {_fmt(p.lo)}..{_fmt(p.hi)}; {default}")
        return None
    return int(x) if p.integer else x


def _knobs(method: str, query: Mapping, notes: list[str]) -> dict:
    m = methods.get(method)
    names = {p.name: p for p in m.params}
    names.update({old: p for p in m.params for old in p.aliases})
    out = {}
    for key, text in query.items():
        if key in RESERVED:
            continue
        p = names.get(key)
        if p is None:
            notes.append(f"`{_key(key)}`: not a knob of {method}; ignored")
        elif (v := _knob(p, text, notes)) is not None:
            out[p.name] = v
    return out


def _layers(text: str, notes: list[str]) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
    if not m or int(m[1]) > int(m[2]):
        notes.append(f"`layers`: {show(text)} is not FIRST-LAST (e.g. 0-3, first <= last); using all layers")
        return None
    return int(m[1]), int(m[2])


def _per_layer(method: str, text: str, notes: list[str]) -> str:
    """The per-layer box's text from a link, or "" (noted) when it is not a mapping of this method's
    per-layer knobs to lists of numbers; the values' lengths and ranges are the Merge's to check."""
    m = methods.get(method)
    per_layer = {p.name for p in m.params if p.per_layer} | {a for p in m.params if p.per_layer for a in p.aliases}
    try:
        got = recipes.parse_yaml(text, "per_layer")
    except LabError as e:
        notes.append(f"`per_layer`: {e}; ignored")
        return ""
    bad = "" if isinstance(got, dict) and got else "is not a mapping of knobs to values"
    if not bad:
        odd = [k for k, v in got.items() if k not in per_layer or not isinstance(v, list)
               or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)]
        bad = f"{show(odd[0])} is not a per-layer knob of {method} with a list of numbers" if odd else ""
    if bad:
        notes.append(f"`per_layer`: {bad}; ignored")
        return ""
    return text.strip()


def parse(query: Mapping, models_root: str | None = None) -> tuple[LabState, list[str]]:
    """The state a URL's query asks for, and one message per parameter that could not be used."""
    notes: list[str] = []
    query = {str(k): str(v) for k, v in query.items() if not str(k).startswith("__")}  # Gradio's own: ?__theme=
    query = dict(list(query.items())[:MAX_KEYS])
    for k, v in list(query.items()):
        if len(v) > MAX_VALUE:
            notes.append(f"`{_key(k)}`: longer than {MAX_VALUE} characters; ignored")
            del query[k]
    fields = _preset(query, models_root, notes)
    method = query.get("method", recipes.DEFAULT_METHOD)
    if method not in methods.names():
        notes.append(f"`method`: {show(method)} is not a merge method ({', '.join(methods.names())}); "
                     f"using {recipes.DEFAULT_METHOD} and its defaults")
        method, knobs = recipes.DEFAULT_METHOD, {}
    else:
        knobs = _knobs(method, query, notes)
    layers = _layers(query["layers"], notes) if "layers" in query else None
    per_layer = _per_layer(method, query["per_layer"], notes) if query.get("per_layer", "").strip() else ""
    tab = query.get("tab", "chat")
    if tab not in TABS:
        notes.append(f"`tab`: {show(tab)} is not one of {', '.join(TABS)}; opening chat")
        tab = "chat"
    return LabState(method=method, knobs=knobs, layers=layers, per_layer=per_layer, tab=tab, **fields), notes


def fit(state: LabState, dims: dict | None) -> tuple[LabState, list[str]]:
    """The state within this model's sizes (dims: num_layers, hidden_size; None when unknown): a layer
    range past the last layer falls back to all layers, a knob above its slider's end (ip_merging's
    rank above the hidden size) is clamped there; each noted."""
    dims = dims or {}
    n, notes = dims.get("num_layers"), []
    layers = state.layers
    if layers and n and layers[1] > n - 1:
        notes.append(f"`layers`: {layers[0]}-{layers[1]} is past this model's last layer {n - 1}; using all layers")
        layers = None
    knobs = dict(state.knobs)
    for p in recipes.numeric_params(state.method):
        lo, hi, why = recipes.slider_range(p, n, dims.get("hidden_size"))
        if p.name in knobs and not lo <= knobs[p.name] <= hi:
            knobs[p.name] = min(max(knobs[p.name], lo), hi)
            notes.append(f"`{p.name}`: {_fmt(state.knobs[p.name])} is past {why} ({_fmt(hi)}); "
                         f"using {_fmt(knobs[p.name])}")
    return replace(state, knobs=knobs, layers=layers), notes


def encoded_knobs(state: LabState) -> list[tuple[str, str]]:
    """The knobs a URL carries for this state: every shown knob its toggle leaves shown, then the
    toggle (frank: use_prior, and w_v or beta)."""
    hides = recipes.toggle_hides(state.method, state.prior)
    out = [(p.name, _fmt(state.knob(p.name))) for p in recipes.shown_params(state.method) if p.name not in hides]
    toggle = methods.get(state.method).toggle
    if toggle is not None:
        out.append((toggle.knob, str(int(state.prior))))
    return out


def beta_query(beta: float) -> dict[str, str]:
    """The query that puts an attention fit's decay rate to use: the first method taking one
    (MergeMethod.attention_knobs; frank: its prior on, with this beta); {} when none does."""
    for m in methods.all_methods():
        knobs = m.attention_knobs(beta)
        if knobs:
            return {"method": m.name, **{k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in knobs.items()}}
    return {}


def encode(state: LabState, num_layers: int | None = None) -> str:
    """The query string for a state (without '?'); defaults that are absent: toy preset, all layers, chat."""
    q: list[tuple[str, str]] = []
    if state.preset == presets.CUSTOM:
        q += [(k, getattr(state, k)) for k in ROLES]
    elif state.preset != presets.DEFAULT:
        q.append(("preset", slug(state.preset)))
    q.append(("method", state.method))
    q += encoded_knobs(state)
    if state.layers and num_layers and state.layers != (0, num_layers - 1):
        q.append(("layers", f"{state.layers[0]}-{state.layers[1]}"))
    if state.per_layer.strip():
        q.append(("per_layer", state.per_layer.strip()))
    if state.tab != "chat":
        q.append(("tab", state.tab))
    return urlencode(q)


def js_layout() -> dict:
    """What the browser-side encoder needs to know about presets and methods."""
    return {
        "slugs": {label: slug(label) for label in presets.labels()},
        "default": presets.DEFAULT, "custom": presets.CUSTOM, "sliders": recipes.SLIDERS,
        "methods": {m.name: {"sliders": [p.name for p in recipes.numeric_params(m.name)],
                             "radios": [p.name for p in recipes.choice_params(m.name)],
                             "toggle": m.toggle.knob if m.toggle else None,
                             "hides": ({str(on).lower(): list(m.toggle.hides(on)) for on in (True, False)}
                                       if m.toggle else {})}
                    for m in methods.all_methods()},
    }


ENCODER = """
(preset, vlm, reasoner, base, method, prior, first, last, nLayers, tab, perLayer, ...pool) => {
  const L = %s;
  const q = new URLSearchParams();
  for (const [k, v] of new URLSearchParams(location.search)) if (k.startsWith("__")) q.set(k, v);
  const num = (v) => String(Math.round(Number(v) * 1e6) / 1e6);
  if (preset === L.custom) { q.set("vlm", vlm || ""); q.set("reasoner", reasoner || ""); q.set("base", base || ""); }
  else if (preset !== L.default) q.set("preset", L.slugs[preset] || preset);
  q.set("method", method);
  const m = L.methods[method] || {sliders: [], radios: [], toggle: null, hides: {}};
  const hides = m.hides[String(!!prior)] || [];
  m.sliders.forEach((name, i) => { if (!hides.includes(name) && pool[i] != null) q.set(name, num(pool[i])); });
  m.radios.forEach((name, i) => { const v = pool[L.sliders + i]; if (v != null) q.set(name, num(v)); });
  if (m.toggle) q.set(m.toggle, prior ? "1" : "0");
  const n = parseInt(nLayers);
  if (n > 0 && (Number(first) > 0 || Number(last) < n - 1)) q.set("layers", `${Number(first)}-${Number(last)}`);
  if (perLayer && perLayer.trim()) q.set("per_layer", perLayer.trim());
  if (tab && tab !== "chat") q.set("tab", tab);
  const s = q.toString();
  history.replaceState(history.state, "", s ? "?" + s : location.pathname);
  return [];
}
"""


def encoder_js() -> str:
    """The event js that writes the URL from the page's controls, in the order of page_state.url_inputs."""
    return ENCODER % json.dumps(js_layout())
