"""The "Merge" panel: method, its knobs, layer range, Merge / Cancel, the recipe and Export (UI side)."""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from analysis.figures import merge_report_figure
from merging import merge_report, methods
from merging.errors import LabError
from merging.layout import ROLES
from webapp.presets import TOY_ROOT
from webapp.protocol import DriftRun, recipe_key, triple_of
from webapp.ui import cancel_button, knob_controls, plot_export, recipes
from webapp.ui.export_zip import zip_for_download
from webapp.ui.lab import Lab, follow_status, made_of, session_of
from webapp.ui.models_panel import ModelsPanel, check
from webapp.ui.recipe_paths import portable_yaml
from webapp.ui.variants import variant_label


@dataclass
class MergePanel:
    method: gr.Dropdown
    about: gr.Markdown
    sliders: list  # the pool of sliders: a method's number knobs, in order
    radios: list  # the pool of radios: its choice knobs (recipes.is_choice), in order
    prior: gr.Checkbox
    first: gr.Slider
    last: gr.Slider
    layers_n: gr.Textbox  # hidden: the model's layer count, for the browser's URL encoder
    advanced: gr.Textbox
    typed: gr.Textbox  # hidden: what was last typed or dragged into each slider (JSON), before the browser clamps it
    merge_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    export_status: gr.Markdown
    recipe_state: gr.State
    variant_state: gr.State  # what chat's "merged" side uses: this merge's recipe, or a DRIFT result
    outcome: gr.Markdown | None = None  # a walkthrough step's measured outcome (webapp.ui.walk_outcome)

    @property
    def knobs(self) -> list:
        return [*self.sliders, *self.radios]

    @property
    def apply_targets(self) -> list:
        """The components apply() updates."""
        return [self.method, self.about, self.prior, self.advanced, self.typed, self.first, self.last,
                self.layers_n, *self.knobs]

    def apply(self, state, dims: dict | None) -> dict:
        """Updates that show this panel in a url_state.LabState (the URL restore and the walkthrough)."""
        n = (dims or {}).get("num_layers")
        first, last = state.layers or (0, (n or 32) - 1)
        ups = {self.method: state.method, self.about: knob_controls.describe(state.method),
               self.prior: knob_controls.toggle_update(state.method, value=state.prior),
               self.advanced: state.per_layer, self.typed: "",
               self.first: gr.update(maximum=(n or 32) - 1, value=first),
               self.last: gr.update(maximum=(n or 32) - 1, value=last), self.layers_n: str(n or "")}
        values = {p.name: state.knob(p.name) for p in recipes.shown_params(state.method)}
        ups.update(zip(self.knobs, knob_controls.knob_updates(state.method, dims, values, state.prior)))
        return ups


def _report_text(report: dict | None) -> str:
    """The merge report under the status line: what changed, the method's selection, warnings."""
    if not report:
        return ""
    lines = merge_report.summary_lines(report)
    body = [f"- {line}" for line in lines if not line.startswith("warning: ")]
    warns = [f"- **Warning:** {line[len('warning: '):]}" for line in lines if line.startswith("warning: ")]
    return "\n\n" + "\n".join(body + warns)


TYPED_JS = """(v, typed) => { let o = {}; try { o = JSON.parse(typed || "{}"); } catch (e) {}
  o["%d"] = v; return JSON.stringify(o); }"""


def _controls() -> SimpleNamespace:
    """The panel's components, created in page order."""
    c = SimpleNamespace()
    c.method = gr.Dropdown(methods.names(), value=recipes.DEFAULT_METHOD, label="Merge method", elem_id="merge-method")
    c.about = gr.Markdown(knob_controls.describe(recipes.DEFAULT_METHOD))
    ups = knob_controls.knob_updates(recipes.DEFAULT_METHOD)
    c.sliders, c.radios = [], []
    for i in range(recipes.SLIDERS):
        spec = {k: v for k, v in ups[i].items() if k != "__type__"}
        spec.setdefault("label", f"knob {i + 1}")
        c.sliders.append(gr.Slider(interactive=True, elem_id=f"knob-{i + 1}", **spec))
    for i in range(recipes.CHOICES):
        spec = {k: v for k, v in ups[recipes.SLIDERS + i].items() if k != "__type__"}
        spec.setdefault("label", f"choice {i + 1}")
        c.radios.append(gr.Radio(interactive=True, elem_id=f"choice-{i + 1}", **spec))
    # One checkbox serves every method's toggle; hidden until a method with one is chosen. The element
    # id is kept as it was: the browser tests find the checkbox by it.
    first = next((m.toggle for m in methods.all_methods() if m.toggle), None)
    c.prior = gr.Checkbox(False, label=first.label if first else "", info=first.info if first else None,
                          visible=False, elem_id="frank-prior")
    c.typed = gr.Textbox("", visible="hidden", elem_id="knob-typed")
    c.clamp_note = gr.Markdown("", elem_id="clamp-note")  # a typed value the browser clamped, said at once
    with gr.Accordion("Layer range and per-layer values", open=False):
        with gr.Row():
            top = _default_layers() - 1
            c.first = gr.Slider(0, top, value=0, step=1, label="first layer", elem_id="layer-first")
            c.last = gr.Slider(0, top, value=top, step=1, label="last layer", elem_id="layer-last")
        c.advanced = gr.Textbox("", label="Per-layer values (YAML, overrides the sliders)", lines=2,
                                placeholder="alpha: [0.0, 0.1, 0.2, 0.3]")
    c.layers_n = gr.Textbox("", visible="hidden", elem_id="layers-n")
    c.dims_seen = gr.State(None)  # the model dims the layer range was last fitted to
    with gr.Row():
        c.merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
        c.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
    c.status = gr.Markdown("Choose a method and press **Merge**.", elem_id="merge-status")
    c.live = gr.Markdown("", elem_id="merge-live")  # what the chat answers with, when the panel differs from it
    c.outcome = gr.Markdown("", elem_id="merge-outcome")
    c.change_plot = plot_export.plot(label="what the merge changed, per layer", visible=False, elem_id="merge-change-plot")
    c.recipe_state = gr.State(None)
    c.variant_state = gr.State(None)
    with gr.Accordion("Recipe (YAML) and export", open=False):
        c.recipe_code = gr.Code(language="yaml", label="recipe of the current merge", lines=8)
        c.recipe_file = gr.File(label="download the recipe", interactive=False)
        c.export_btn = gr.Button("Export merged model to a folder", size="sm")
        c.export_status = gr.Markdown(elem_id="export-status")
        c.export_file = gr.File(label="download the merged model (zip)", interactive=False, visible=False,
                                elem_id="export-file")
    return c


def _fit_layers(dims, seen, first, last):
    """The layer range for newly checked models: all layers, except that the page's first model keeps
    a range that fits it (one a link asked for) and the same model keeps the range it has."""
    n = (dims or {}).get("num_layers")
    if not n:
        return gr.skip(), gr.skip()
    prev = (seen or {}).get("num_layers")
    if prev == n:
        return gr.skip(), gr.skip()
    fits = first is not None and last is not None and 0 <= int(first) <= int(last) <= n - 1
    if prev is None and fits:
        return gr.update(maximum=n - 1), gr.update(maximum=n - 1)
    return gr.update(maximum=n - 1, value=0), gr.update(maximum=n - 1, value=n - 1)


def _wire_controls(c: SimpleNamespace, models: ModelsPanel) -> None:
    """Method -> its knobs; models -> the layer range, knob caps and whether Merge is clickable.
    The method and prior listen to the user (input) or to any change where the result is the same
    whoever set them, so MergePanel.apply (a link, the walkthrough) is not undone by its own updates."""
    def on_method(name, dims, prior):
        # the one checkbox serves every method's toggle: another method starts at its own default (frank's
        # prior left on would otherwise turn on ip_merging's threshold rule and hide top_fraction)
        on = knob_controls.toggle_default(name)
        return [knob_controls.describe(name), knob_controls.toggle_update(name, value=on), "",
                *knob_controls.knob_updates(name, dims, None, on)]

    knobs = [*c.sliders, *c.radios]
    c.method.input(on_method, [c.method, models.dims, c.prior], [c.about, c.prior, c.typed, *knobs], queue=False,
                   api_visibility="private")
    c.prior.change(knob_controls.prior_updates, [c.method, c.prior], c.sliders, queue=False, api_visibility="private")
    for i, s in enumerate(c.sliders):
        s.input(None, [s, c.typed], c.typed, js=TYPED_JS % i)

    def on_models(dims, seen, first, last, ok, method, *values):
        caps = []
        for i in range(recipes.SLIDERS):
            nums = recipes.numeric_params(method)
            if i >= len(nums) or values[i] is None:
                caps.append(gr.skip())
                continue
            _, hi, _ = recipes.slider_range(nums[i], (dims or {}).get("num_layers"), (dims or {}).get("hidden_size"))
            caps.append(gr.update(maximum=hi, value=min(values[i], hi)))
        n = (dims or {}).get("num_layers")
        return (*_fit_layers(dims, seen, first, last), str(n or ""), dims if n else seen,
                gr.update(interactive=bool(ok)), *caps)

    models.dims.change(on_models, [models.dims, c.dims_seen, c.first, c.last, models.compatible, c.method, *c.sliders],
                       [c.first, c.last, c.layers_n, c.dims_seen, c.merge_btn, *c.sliders], queue=False,
                       api_visibility="private")
    for ev in models.check_events:  # after each check, edit or preset pick: Merge only when compatible
        ev.then(lambda ok: gr.update(interactive=bool(ok)), models.compatible, c.merge_btn, queue=False,
                api_visibility="private")
    models.compatible.change(lambda ok: gr.update(interactive=bool(ok)), models.compatible, c.merge_btn,
                             queue=False, api_visibility="private")


def live_line(variant, method, first, last, prior, advanced, dims, *knob_values) -> str:
    """'' while the panel shows what the chat answers with; else what is live, and that the panel
    differs (a walkthrough step, a method or knob changed since the merge): the status above is of it."""
    if not variant:
        return ""
    label = variant_label(variant)
    if isinstance(variant, DriftRun):
        return (f"⚠ **Live in the chat:** {label} (the DRIFT run), not a merge of the panel's settings: press "
                "**Merge** to chat with those.")
    sliders, radios = knob_values[:recipes.SLIDERS], knob_values[recipes.SLIDERS:]
    try:
        shown = recipes.build(dict(zip(ROLES, triple_of(variant))), method,
                              recipes.in_shown_order(method, sliders, radios), first, last,
                              (dims or {}).get("num_layers"), bool(prior), advanced or "")
    except (LabError, TypeError, ValueError):
        shown = None
    if shown == variant:
        return ""
    return (f"⚠ **Live in the chat:** {label}. The panel now shows other settings ({method}): the status "
            "above is of the live merge; press **Merge** to use the panel's.")


def _clamp_line(method, typed, dims, *slider_values) -> str:
    return "".join(f"⚠ **Clamped:** {n}\n\n" for n in knob_controls.clamp_notes(method, typed, slider_values, dims))


def _merge_handler(lab: Lab):
    def merge(request: gr.Request, preset, vlm, reasoner, base, method, first_layer, last_layer, prior,
              per_layer_yaml, typed, *knob_values):
        """knob_values: the pooled sliders (the method's number knobs in order), then the radios (its
        choice knobs); frank's use_prior is the prior checkbox. The request comes first: Gradio injects
        it only positionally. typed: what the page last saw typed into each slider, to say what it clamped."""
        keep = (gr.skip(),) * 6
        sliders, radios = knob_values[:recipes.SLIDERS], knob_values[recipes.SLIDERS:]
        try:
            rep, triple = check(lab, preset, vlm, reasoner, base)
            rep.raise_if_incompatible()
            v = rep.layouts["vlm"]
            clamped = knob_controls.clamp_notes(method, typed, sliders, {"num_layers": v.num_layers, "hidden_size": v.hidden_size})
            recipe = recipes.build(triple, method, recipes.in_shown_order(method, sliders, radios), first_layer,
                                   last_layer, v.num_layers, bool(prior), per_layer_yaml or "")
        except LabError as e:
            yield (f"✗ **Cannot merge:** {e}", *keep)
            return
        note = "".join(f"\n\n⚠ **Clamped:** {n}" for n in clamped)
        job = lab.client.submit("merge", {"recipe": recipe}, session_of(request))
        for text, end in follow_status(lab.client, job, f"Merging with {method}"):
            if end is None:
                yield (text + note, *keep)
                continue
            ev, payload, el = end
            if ev == "result":
                done = _merged(method, recipe, payload, el, lab.models_root)
                yield (done[0] + note, *done[1:])
            elif ev == "cancelled":
                yield (f"■ **Merge cancelled** ({payload}); nothing of it was kept: the chat answers with what it "
                       "answered with before (the pane titles name it).", *keep)
            else:
                yield (f"✗ **Merge failed:** {payload}", *keep)

    return merge


def _merged(method: str, recipe: dict, payload: dict, el: float, models_root: str | None) -> tuple:
    """The outputs of a finished merge: status with its report, the recipe, its download, the states,
    the plot, and an empty export line (no stale "Merge first" under a merge)."""
    # A fresh temp folder: Gradio copies a returned file into its own cache and serves that copy,
    # so no folder of the lab's ever needs to be servable.
    path = Path(tempfile.mkdtemp(prefix="merge-lab-recipe-")) / f"{method}-{recipe_key(recipe)}.yaml"
    text = portable_yaml(recipe, models_root)  # no server paths in what the user takes away
    path.write_text(text)
    how = "already merged, reused" if payload.get("reused") else f"merge {payload['merge_seconds']:.2f} s"
    report = payload.get("report")
    plot = gr.update(value=merge_report_figure(report), visible=True) if report else gr.update(visible=False)
    return (f"✓ **Merged with {method}** in {el:.2f} s ({how}, on {payload['device']}). "
            "Chat with it or open the analyses." + _report_text(report),
            text, str(path), recipe, recipe, plot, "")


def _default_layers() -> int:
    """The bundled family's decoder layers: the sliders start at its range, so the page's first check
    changes nothing (a value above the new maximum, sent by an event fired meanwhile, is refused by
    Gradio's bounds check with an error in the log)."""
    try:
        cfg = json.loads((TOY_ROOT / "vlm" / "config.json").read_text())
        n = (cfg.get("text_config") or cfg).get("num_hidden_layers")
        return int(n) if isinstance(n, int) and 1 <= n <= 1024 else 32
    except (OSError, ValueError, AttributeError):
        return 32


def _export_handler(lab: Lab):
    def export(recipe, request: gr.Request = None):
        if not recipe:
            yield "Merge first; then the merged model can be exported.", gr.update(visible=False)
            return
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{recipe['method']}-{recipe_key(recipe)}-{int(time.time())}")
        out_dir, n = lab.cache_dir / "exports" / name, 1
        while out_dir.exists():  # two exports of one recipe in the same second
            n += 1
            out_dir = lab.cache_dir / "exports" / f"{name}-{n}"
        job = lab.client.submit("export", {"recipe": recipe, "out_dir": str(out_dir)}, session_of(request))
        for text, end in follow_status(lab.client, job, "Writing the merged model"):
            if end is None:
                yield text, gr.skip()
            elif end[0] == "result":
                folder = end[1]["path"]
                archive, why = zip_for_download(Path(folder))
                where = f"✓ Exported in {end[2]:.1f} s to `{folder}` on the server"
                yield (f"{where}; download it below." if archive else f"{where}. {why}",
                       gr.update(value=str(archive), visible=True) if archive else gr.update(visible=False))
            else:
                yield f"✗ Export {end[0]}: {end[1]}", gr.skip()

    return export


def build(lab: Lab, models: ModelsPanel) -> MergePanel:
    c = _controls()
    panel = MergePanel(c.method, c.about, c.sliders, c.radios, c.prior, c.first, c.last, c.layers_n, c.advanced,
                       c.typed, c.merge_btn, c.cancel_btn, c.status, c.export_status, c.recipe_state, c.variant_state,
                       c.outcome)
    _wire_controls(c, models)
    inputs = [*models.inputs, c.method, c.first, c.last, c.prior, c.advanced, c.typed, *panel.knobs]
    outputs = [c.status, c.recipe_code, c.recipe_file, c.recipe_state, c.variant_state, c.change_plot, c.export_status]
    c.merge_btn.click(knob_controls.name_knobs(_merge_handler(lab)), inputs, outputs, api_name="merge", concurrency_limit=16)
    # this panel's own jobs only: a knockout running in the analysis tab has its own Cancel
    cancel_button.wire(lab, c.cancel_btn, ("merge", "export"), api_name="cancel")
    c.export_btn.click(_export_handler(lab), c.recipe_state, [c.export_status, c.export_file], api_name="export",
                       concurrency_limit=16)
    # another merge: the zip offered was of the previous one
    c.recipe_state.change(lambda: gr.update(value=None, visible=False), None, c.export_file, queue=False,
                          api_visibility="private")

    def triple_changed(recipe, *triple):  # the merge shown was of the previous triple: drop it everywhere
        if not recipe or made_of(lab, recipe, *triple):  # nothing merged, or the same triple picked again
            return (gr.skip(),) * len(outputs)
        return ("Another triple: press **Merge** to merge this one.", "", None, None, None,
                gr.update(visible=False), "")

    # queued: only a queued event's new State values fire those States' change (the outcome line, the sweep's knobs)
    models.preset.input(triple_changed, [c.recipe_state, *models.inputs], outputs, api_visibility="private")
    gr.on([c.variant_state.change, c.method.change, c.prior.change, c.first.change, c.last.change, c.advanced.change,
           *[k.change for k in panel.knobs]], live_line,
          [c.variant_state, c.method, c.first, c.last, c.prior, c.advanced, models.dims, *panel.knobs], c.live,
          queue=False, api_visibility="private", show_progress="hidden", preprocess=False)
    # preprocess off for these two display-only lines: they fire while a method or triple change is still
    # moving the sliders' bounds, and Gradio's bounds check would refuse the value of a moment before
    gr.on([c.typed.change, c.method.change, *[s.change for s in c.sliders]], _clamp_line,
          [c.method, c.typed, models.dims, *c.sliders], c.clamp_note, queue=False, api_visibility="private",
          show_progress="hidden", preprocess=False)
    return panel
