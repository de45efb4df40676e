"""The Handout button: this tab's merge as one offline HTML file (analysis.handout in the worker), with
the walkthrough's text beside the numbers just measured; offered for download (UI side)."""

from __future__ import annotations

import re
import time

import gradio as gr

from webapp.protocol import recipe_key
from webapp.ui import cancel_button
from webapp.ui.export_zip import exports_folder
from webapp.ui.lab import Lab, follow_result, session_of
from webapp.ui.recipe_paths import portable_ref
from webapp.ui.walkthrough import STEPS

DEFAULT_LIMIT = 30  # items per suite for the scores (analysis.handout's default)


def _shown(recipe: dict, models_root: str | None) -> dict:
    """The recipe as the handout shows it: no path of the server's file system."""
    return {k: (portable_ref(v, models_root)[0] if k in ("vlm", "reasoner", "base") and v else v)
            for k, v in recipe.items()}


def _handler(lab: Lab):
    def write(recipe, limit, request: gr.Request = None):
        if not recipe:
            yield "Merge first: a handout describes this tab's merge.", gr.update(visible=False)
            return
        args = {"recipe": recipe, "shown_recipe": _shown(recipe, lab.models_root), "limit": int(limit or 0),
                "lesson": [{"title": s.title, "text": s.text} for s in STEPS]}
        job = lab.client.submit("handout", args, session_of(request))
        got = yield from follow_result(lab.client, job, "Writing the handout", (gr.skip(),))
        if got is None:
            return
        payload, el = got
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"handout-{recipe['method']}-{recipe_key(recipe)}-{int(time.time())}")
        path = exports_folder() / f"{name}.html"
        path.write_text(payload["html"], encoding="utf-8")
        yield (f"✓ Written in {el:.1f} s: one HTML file that opens offline; download it below.",
               gr.update(value=str(path), visible=True))

    return write


def build(lab: Lab, recipe_state: gr.State) -> None:
    with gr.Accordion("Handout: this merge as one offline HTML file", open=False, elem_id="handout"):
        gr.Markdown("The recipe, the VLM's and the merge's scores on the bundled suites with 95% intervals, "
                    "every analysis figure with what it shows, and the walkthrough's text: one file for a class "
                    "or a notebook, which opens without a network. Analyses already computed come from the cache.")
        with gr.Row():
            limit = gr.Number(DEFAULT_LIMIT, label="items per suite", precision=0, minimum=1, maximum=100,
                              scale=0, min_width=140)
            btn = gr.Button("Write the handout", variant="primary", scale=0, min_width=160, elem_id="handout-btn")
            stop = gr.Button("Cancel", variant="stop", scale=0, min_width=100)
        status = gr.Markdown(elem_id="handout-status")
        file = gr.File(label="handout (HTML)", interactive=False, visible=False, elem_id="handout-file")
    btn.click(_handler(lab), [recipe_state, limit], [status, file], api_name="handout", concurrency_limit=16)
    cancel_button.wire(lab, stop, ("handout",), api_name="cancel_handout")
