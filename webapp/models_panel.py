"""The "Models" panel: pick a preset or a custom triple and see its compatibility report (UI side).

The report comes from merging.compat.check_triple, which reads only file headers, so it runs
in the UI process at once (no waiting behind a merge in the worker queue).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from merging.errors import LabError
from webapp import presets
from webapp.lab import Lab

_reports: dict[tuple, object] = {}


def check(lab: Lab, preset: str, vlm: str, reasoner: str, base: str):
    """(CompatReport, triple dict); LabError when a model is missing or unreadable."""
    triple = lab.triple(preset, vlm, reasoner, base)
    key = tuple(triple.values())
    if key not in _reports:
        from merging.compat import check_triple

        _reports[key] = check_triple(triple["vlm"], triple["reasoner"], triple["base"])
    return _reports[key], triple


def report_markdown(rep, preset: str) -> str:
    head = "### ✅ Compatible: ready to merge" if rep.ok else f"### ⛔ Cannot merge: {rep.reason}"
    note = ""
    if preset and preset != presets.CUSTOM:
        p = presets.by_label(preset)
        note = f"\n\n_{p.note}_" if p.note else ""
    v = rep.layouts["vlm"]
    summary = (f"\n\n{v.num_layers} decoder layers · hidden size {v.hidden_size} · "
               f"{len(v.lm)} language-model tensors merged · {len(v.other)} vision/projector tensors untouched")
    return head + note + summary


@dataclass
class ModelsPanel:
    preset: gr.Dropdown
    vlm: gr.Textbox
    reasoner: gr.Textbox
    base: gr.Textbox
    report: gr.Markdown
    details: gr.Code
    num_layers: gr.State
    compatible: gr.State
    dims: gr.State  # {"num_layers", "hidden_size", "context"} of the checked VLM, or None

    @property
    def inputs(self) -> list:
        return [self.preset, self.vlm, self.reasoner, self.base]


def build(lab: Lab) -> ModelsPanel:
    root_note = f" (folders inside {lab.models_root})" if lab.models_root else ""
    preset = gr.Dropdown(presets.labels(), value=presets.DEFAULT, label="Model triple",
                         info="VLM + reasoning LLM + the base LLM both were fine-tuned from")
    with gr.Group(visible=False) as custom:
        vlm = gr.Textbox("", label="VLM", placeholder=f"folder or hub id{root_note}")
        reasoner = gr.Textbox("", label="Reasoner (math LLM)", placeholder=f"folder or hub id{root_note}")
        base = gr.Textbox("", label="Shared base LLM", placeholder=f"folder or hub id{root_note}")
        check_btn = gr.Button("Check compatibility", size="sm")
    report = gr.Markdown("Checking the bundled toy family…")
    with gr.Accordion("Compatibility report (details)", open=False):
        details = gr.Code(language=None, label="report", lines=6)
    panel = ModelsPanel(preset, vlm, reasoner, base, report, details, gr.State(None), gr.State(False), gr.State(None))

    def on_check(preset_v, vlm_v, reasoner_v, base_v):
        show_custom = gr.update(visible=preset_v == presets.CUSTOM)
        if preset_v == presets.CUSTOM and not all((x or "").strip() for x in (vlm_v, reasoner_v, base_v)):
            return show_custom, "Enter the three models, then press **Check compatibility**.", "", None, False, None
        try:
            rep, _ = check(lab, preset_v, vlm_v, reasoner_v, base_v)
        except LabError as e:
            return show_custom, f"### ⛔ {e}", "", None, False, None
        v = rep.layouts["vlm"]
        dims = {"num_layers": v.num_layers, "hidden_size": v.hidden_size, "context": v.context}
        return (show_custom, report_markdown(rep, preset_v), "\n".join(rep.lines()), v.num_layers, rep.ok, dims)

    outs = [custom, report, details, panel.num_layers, panel.compatible, panel.dims]
    preset.change(on_check, panel.inputs, outs, api_name="check_preset", queue=False)
    check_btn.click(on_check, panel.inputs, outs, api_name="check")
    panel.load_event = (on_check, panel.inputs, outs)
    return panel
