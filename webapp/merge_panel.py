"""The "Merge" panel: method, its knobs, layer range, Merge / Cancel, the recipe and Export (UI side)."""

from __future__ import annotations

import inspect
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
from webapp import recipes
from webapp.jobs import recipe_key
from webapp.lab import Lab, follow_status, session_of
from webapp.models_panel import ModelsPanel, check


@dataclass
class MergePanel:
    method: gr.Dropdown
    knobs: list
    prior: gr.Checkbox
    first: gr.Slider
    last: gr.Slider
    advanced: gr.Textbox
    merge_btn: gr.Button
    cancel_btn: gr.Button
    status: gr.Markdown
    recipe_state: gr.State
    variant_state: gr.State  # what chat's "merged" side uses: this merge's recipe, or a DRIFT result


def _report_text(report: dict | None) -> str:
    """The merge report under the status line: what changed, the method's selection, warnings."""
    if not report:
        return ""
    lines = merge_report.summary_lines(report)
    body = [f"- {line}" for line in lines if not line.startswith("warning: ")]
    warns = [f"- **Warning:** {line[len('warning: '):]}" for line in lines if line.startswith("warning: ")]
    return "\n\n" + "\n".join(body + warns)


def _name_knobs(fn, n: int):
    """Name fn's pooled *knob_values knob1..knobN in the API (Gradio reads the signature), so clients
    can pass knob1=... without a hand-written parameter per slider."""
    sig = inspect.signature(fn)
    fixed = [p for p in sig.parameters.values() if p.kind is not p.VAR_POSITIONAL]
    pooled = [inspect.Parameter(f"knob{i + 1}", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
              for i in range(n)]
    fn.__signature__ = sig.replace(parameters=fixed + pooled)
    return fn


def _knob_updates(method: str, num_layers=None) -> list:
    shown = recipes.shown_params(method)
    ups = []
    for i in range(recipes.POOL):
        if i < len(shown):
            ups.append(gr.update(visible=True, **recipes.slider_spec(shown[i], num_layers)))
        else:
            ups.append(gr.update(visible=False, value=None))
    return ups


def _describe(method: str) -> str:
    m = methods.get(method)
    base = "" if m.needs_base else " (does not need the base model)"
    return f"_{m.description or m.name}{base}_"


def _controls() -> SimpleNamespace:
    """The panel's components, created in page order."""
    c = SimpleNamespace()
    c.method = gr.Dropdown(methods.names(), value=recipes.DEFAULT_METHOD, label="Merge method")
    c.about = gr.Markdown(_describe(recipes.DEFAULT_METHOD))
    shown = recipes.shown_params(recipes.DEFAULT_METHOD)
    c.knobs = []
    for i in range(recipes.POOL):
        spec = recipes.slider_spec(shown[i]) if i < len(shown) else {"label": f"knob {i}"}
        c.knobs.append(gr.Slider(visible=i < len(shown), interactive=True, **spec))
    c.prior = gr.Checkbox(False, label="Use the attention-decay prior (beta)", visible=False,
                          info="FRANK: weight the VLM more in early layers, where images get most attention")
    with gr.Accordion("Layer range and per-layer values", open=False):
        with gr.Row():
            c.first = gr.Slider(0, 31, value=0, step=1, label="first layer")
            c.last = gr.Slider(0, 31, value=31, step=1, label="last layer")
        c.advanced = gr.Textbox("", label="Per-layer values (YAML, overrides the sliders)", lines=2,
                                placeholder="alpha: [0.0, 0.1, 0.2, 0.3]")
    with gr.Row():
        c.merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
        c.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
    c.status = gr.Markdown("Choose a method and press **Merge**.", elem_id="merge-status")
    c.change_plot = gr.Plot(label="what the merge changed, per layer", visible=False, elem_id="merge-change-plot")
    c.recipe_state = gr.State(None)
    c.variant_state = gr.State(None)
    with gr.Accordion("Recipe (YAML) and export", open=False):
        c.recipe_code = gr.Code(language="yaml", label="recipe of the current merge", lines=8)
        c.recipe_file = gr.File(label="download the recipe", interactive=False)
        c.export_btn = gr.Button("Export merged model to a folder", size="sm")
        c.export_status = gr.Markdown()
    return c


def _wire_controls(c: SimpleNamespace, models: ModelsPanel) -> None:
    """Method -> its knobs; models -> the layer range and whether Merge is clickable."""
    def on_method(name, n_layers):
        return [_describe(name), gr.update(visible=name == "frank")] + _knob_updates(name, n_layers)

    c.method.change(on_method, [c.method, models.num_layers], [c.about, c.prior, *c.knobs], queue=False,
                    api_visibility="private")

    def on_models(n_layers, ok):
        n = int(n_layers or 32)
        return (gr.update(maximum=n - 1, value=0), gr.update(maximum=n - 1, value=n - 1),
                gr.update(interactive=bool(ok)))

    models.num_layers.change(on_models, [models.num_layers, models.compatible], [c.first, c.last, c.merge_btn],
                             queue=False, api_visibility="private")
    models.compatible.change(lambda ok: gr.update(interactive=bool(ok)), models.compatible, c.merge_btn,
                             queue=False, api_visibility="private")


def _merge_handler(lab: Lab):
    def merge(request: gr.Request, preset, vlm, reasoner, base, method, first_layer, last_layer, prior,
              per_layer_yaml, *knob_values):
        """knob_values: the method's knobs in merging.methods.get(method).params order (frank's use_prior
        aside), one per slider of the pool. The request comes first: Gradio injects it only positionally."""
        keep = (gr.skip(),) * 5
        try:
            rep, triple = check(lab, preset, vlm, reasoner, base)
            rep.raise_if_incompatible()
            recipe = recipes.build(triple, method, knob_values, first_layer, last_layer,
                                   rep.layouts["vlm"].num_layers, bool(prior), per_layer_yaml or "")
        except LabError as e:
            yield (f"❌ **Cannot merge:** {e}", *keep)
            return
        job = lab.client.submit("merge", {"recipe": recipe}, session_of(request))
        for text, end in follow_status(lab.client, job, f"Merging with {method}"):
            if end is None:
                yield (text, *keep)
                continue
            ev, payload, el = end
            if ev == "result":
                yield _merged(method, recipe, payload, el)
            elif ev == "cancelled":
                yield (f"⏹ **Merge cancelled** ({payload}); the model is back to the original VLM.", *keep)
            else:
                yield (f"❌ **Merge failed:** {payload}", *keep)

    return merge


def _merged(method: str, recipe: dict, payload: dict, el: float) -> tuple:
    """The outputs of a finished merge: status with its report, the recipe, its download, the states."""
    # A fresh temp folder: Gradio copies a returned file into its own cache and serves that copy,
    # so no folder of the lab's ever needs to be servable.
    path = Path(tempfile.mkdtemp(prefix="merge-lab-recipe-")) / f"{method}-{recipe_key(recipe)}.yaml"
    path.write_text(recipes.to_yaml(recipe))
    how = "already merged, reused" if payload.get("reused") else f"merge {payload['merge_seconds']:.2f} s"
    report = payload.get("report")
    plot = gr.update(value=merge_report_figure(report), visible=True) if report else gr.update(visible=False)
    return (f"✅ **Merged with {method}** in {el:.2f} s ({how}, on {payload['device']}). "
            "Chat with it or open the analyses." + _report_text(report),
            recipes.to_yaml(recipe), str(path), recipe, recipe, plot)


def _cancel_handler(lab: Lab):
    def cancel(request: gr.Request = None):
        n = lab.client.cancel_session(session_of(request), ("merge", "export", "analysis"))
        return "⏹ Cancelling…" if n else "Nothing is running."

    return cancel


def _export_handler(lab: Lab):
    def export(recipe, request: gr.Request = None):
        if not recipe:
            yield "Merge first; then the merged model can be exported."
            return
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{recipe['method']}-{recipe_key(recipe)}-{int(time.time())}")
        out_dir, n = lab.cache_dir / "exports" / name, 1
        while out_dir.exists():  # two exports of one recipe in the same second
            n += 1
            out_dir = lab.cache_dir / "exports" / f"{name}-{n}"
        job = lab.client.submit("export", {"recipe": recipe, "out_dir": str(out_dir)}, session_of(request))
        for text, end in follow_status(lab.client, job, "Writing the merged model"):
            if end is None:
                yield text
            elif end[0] == "result":
                yield f"✅ Exported in {end[2]:.1f} s to `{end[1]['path']}`"
            else:
                yield f"❌ Export {end[0]}: {end[1]}"

    return export


def build(lab: Lab, models: ModelsPanel) -> MergePanel:
    c = _controls()
    panel = MergePanel(c.method, c.knobs, c.prior, c.first, c.last, c.advanced, c.merge_btn, c.cancel_btn,
                       c.status, c.recipe_state, c.variant_state)
    _wire_controls(c, models)
    inputs = [*models.inputs, c.method, c.first, c.last, c.prior, c.advanced, *c.knobs]
    outputs = [c.status, c.recipe_code, c.recipe_file, c.recipe_state, c.variant_state, c.change_plot]
    c.merge_btn.click(_name_knobs(_merge_handler(lab), len(c.knobs)), inputs, outputs, api_name="merge",
                      concurrency_limit=16)
    c.cancel_btn.click(_cancel_handler(lab), None, c.status, api_name="cancel", queue=False)
    c.export_btn.click(_export_handler(lab), c.recipe_state, c.export_status, api_name="export",
                       concurrency_limit=16)
    return panel
