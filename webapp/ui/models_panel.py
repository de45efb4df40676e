"""The "Models" panel: pick a preset or a custom triple and see its compatibility report (UI side).

The report comes from merging.compat.check_triple, which reads only file headers, so it runs
in the UI process at once (no waiting behind a merge in the worker queue). The memory plan comes
from the worker (it knows its device's free memory), in the chat lane, right after the check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gradio as gr

from merging.compat import check_triple
from merging.errors import LabError
from merging.layout import VOCAB_TENSORS
from webapp import presets
from webapp.ui.lab import Lab

_reports: dict[tuple, object] = {}
ROLE_SPLIT = re.compile(r"; (?=(?:vlm|reasoner|base): )")  # one problem per model in a joined LabError


def check(lab: Lab, preset: str, vlm: str, reasoner: str, base: str):
    """(CompatReport, triple dict); LabError when a model is missing or unreadable."""
    triple = lab.triple(preset, vlm, reasoner, base)
    key = tuple(triple.values())
    if key not in _reports:
        _reports[key] = check_triple(triple["vlm"], triple["reasoner"], triple["base"])
    return _reports[key], triple


def problems_markdown(head: str, problems: list[str], hint: str = "") -> str:
    """A calm list (not one bold line): every problem at once, each on its own line."""
    return f"#### {head}\n\n" + "\n".join(f"- {p}" for p in problems) + (f"\n\n_{hint}_" if hint else "")


def choices() -> list[tuple[str, str]]:
    """The preset dropdown's (shown, value) pairs; a triple not on this machine says so in its name."""
    out = []
    for label in presets.labels():
        missing = label != presets.CUSTOM and presets.missing_parts(presets.by_label(label).triple())
        out.append((f"{label} (not downloaded)" if missing else label, label))
    return out


def report_markdown(rep, preset: str) -> str:
    if not rep.ok:
        return problems_markdown("Cannot merge this triple", rep.problems)
    head = "#### Compatible: ready to merge" + (" (read the warnings below first)" if rep.warnings else "")
    note = ""
    if preset and preset != presets.CUSTOM:
        p = presets.by_label(preset)
        note = f"\n\n_{p.note}_" if p.note else ""
    v = rep.layouts["vlm"]
    # the merge's count (merging.merge_plan): the vocabulary tensors keep the VLM's unless a recipe asks
    vocab = sorted(c for c in v.lm if c in VOCAB_TENSORS)
    kept = f" ({' and '.join(vocab)} keep the VLM's)" if vocab else ""
    summary = (f"\n\n{v.num_layers} decoder layers · hidden size {v.hidden_size} · "
               f"{len(v.lm) - len(vocab)} of its {len(v.lm)} language-model tensors merged over all layers{kept} · "
               f"{len(v.other)} vision/projector tensors untouched")
    dist = ""
    if rep.distances:
        dist = ("\n\nDistance of the weights (relative, two probe matrices): "
                + " · ".join(f"{k} {v:.3f}" for k, v in rep.distances.items()))
    warns = "".join(f"\n- **Warning:** {w}" for w in rep.warnings)
    return head + note + summary + dist + ("\n" + warns if warns else "")


def plan_markdown(lab: Lab, preset: str, vlm: str, reasoner: str, base: str) -> str:
    """The worker's memory plan for the checked triple, as a short list ("" when not checkable)."""
    try:
        rep, triple = check(lab, preset, vlm, reasoner, base)
    except LabError:
        return ""
    if not rep.ok:
        return ""
    ev, payload = lab.client.run("plan", {"triple": triple}, timeout=60)
    if ev != "result":
        return f"_Memory plan unavailable: {payload}_"
    if not payload["fits"]:
        return f"**✗ Does not fit:** {payload['lines'][0]}"
    head, *rest = payload["lines"]
    return "**Memory plan** (where the worker keeps what): " + head + "\n\n" + "\n".join(f"- {x}" for x in rest)


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
    plan: gr.Markdown  # the worker's memory plan for the checked triple

    @property
    def inputs(self) -> list:
        return [self.preset, self.vlm, self.reasoner, self.base]


def build(lab: Lab) -> ModelsPanel:
    root_note = f" (folders inside {lab.models_root})" if lab.models_root else ""
    preset = gr.Dropdown(choices(), value=presets.DEFAULT, label="Model triple",
                         info="VLM + reasoning LLM + the base LLM both were fine-tuned from; the lab never "
                              "downloads: triples marked 'not downloaded' need their models in the local "
                              "Hugging Face cache first")
    with gr.Group(visible=False) as custom:
        vlm = gr.Textbox("", label="VLM", placeholder=f"folder or hub id{root_note}")
        reasoner = gr.Textbox("", label="Reasoner (math LLM)", placeholder=f"folder or hub id{root_note}")
        base = gr.Textbox("", label="Shared base LLM", placeholder=f"folder or hub id{root_note}")
        check_btn = gr.Button("Check compatibility", size="sm")
    report = gr.Markdown("Checking the bundled toy family…")
    with gr.Accordion("Compatibility report (details)", open=False):
        details = gr.Code(language=None, label="report", lines=6, wrap_lines=True)  # no cut lines
    with gr.Accordion("Memory plan", open=False, elem_id="memory-plan"):
        plan = gr.Markdown("", elem_id="memory-plan-text")
    panel = ModelsPanel(preset, vlm, reasoner, base, report, details, gr.State(None), gr.State(False), gr.State(None),
                        plan)

    def on_check(preset_v, vlm_v, reasoner_v, base_v):
        show_custom = gr.update(visible=preset_v == presets.CUSTOM)
        if preset_v == presets.CUSTOM and not all((x or "").strip() for x in (vlm_v, reasoner_v, base_v)):
            return show_custom, "Enter the three models, then press **Check compatibility**.", "", None, False, None
        try:
            rep, _ = check(lab, preset_v, vlm_v, reasoner_v, base_v)
        except LabError as e:
            hint = ("Download the three models (e.g. `huggingface-cli download ID`) and restart the app, "
                    "or pick the bundled toy family." if preset_v != presets.CUSTOM else "")
            return (show_custom, problems_markdown("Not usable here", ROLE_SPLIT.split(str(e)), hint), "", None, False,
                    None)
        v = rep.layouts["vlm"]
        dims = {"num_layers": v.num_layers, "hidden_size": v.hidden_size, "context": v.context}
        return (show_custom, report_markdown(rep, preset_v), "\n".join(rep.lines()), v.num_layers, rep.ok, dims)

    outs = [custom, report, details, panel.num_layers, panel.compatible, panel.dims]
    # kept so the merge panel can chain its button's state on the check itself (a State's .change
    # alone did not reach the button in the browser)
    panel.check_events = [preset.change(on_check, panel.inputs, outs, api_name="check_preset", queue=False),
                          check_btn.click(on_check, panel.inputs, outs, api_name="check")]
    for ev in panel.check_events:
        ev.then(lambda *a: plan_markdown(lab, *a), panel.inputs, plan, api_visibility="private")
    panel.load_event = (on_check, panel.inputs, outs)

    def edited():  # an edited field has not been checked: Merge waits for the check
        return "Fields changed: press **Check compatibility**.", False

    for box in (vlm, reasoner, base):
        panel.check_events.append(box.input(edited, None, [report, panel.compatible], queue=False,
                                            api_visibility="private"))
    return panel
