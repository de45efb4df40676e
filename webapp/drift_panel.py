"""The "DRIFT" panel: a short fine-tune of the VLM steered toward the reasoner, then chat with it (UI side).

The worker trains into <cache-dir>/drift/<hash of the settings> (reused when it exists) and keeps the
result loaded; this tab's chat then answers with it on the "merged" side until the next merge or run.
"""

from __future__ import annotations

import gradio as gr

from merging.drift import DRIFT_DEFAULTS, DRIFT_KEYS, MODES, drift_settings
from merging.errors import LabError
from webapp import cancel_button
from webapp.jobs import DriftRun
from webapp.lab import Lab, follow_status, session_of
from webapp.models_panel import ModelsPanel, check

ABOUT = ("_DRIFT fine-tunes the VLM's language model for a few steps, steering each gradient toward the "
         "reasoner (D = W_reasoner - W_vlm); alpha 0 is a plain fine-tune._")


def _range(name: str) -> str:
    lo, hi = DRIFT_KEYS[name]
    return f"{lo:g} to {hi:g}"


def _drift_handler(lab: Lab):
    def drift(preset, vlm, reasoner, base, mode, alpha, steps, lr, batch_size, examples,
              request: gr.Request = None):
        """Fine-tune the triple's VLM (DRIFT, or plain at alpha 0); chat then uses the result."""
        try:
            rep, triple = check(lab, preset, vlm, reasoner, base)
            rep.raise_if_incompatible()
            typed = {"alpha": alpha, "steps": steps, "lr": lr, "batch_size": batch_size, "examples": examples}
            empty = [k for k, v in typed.items() if v is None]
            if empty:
                raise LabError(f"drift {empty[0]}: enter a number ({_range(empty[0])})")
            settings = drift_settings({"mode": mode, **typed})
        except (LabError, TypeError, ValueError) as e:
            yield f"✗ **Cannot run DRIFT:** {e}", gr.skip()
            return
        args = {"vlm": triple["vlm"], "reasoner": triple["reasoner"], "drift": settings}
        job = lab.client.submit("drift", args, session_of(request))
        what = "Plain fine-tune" if settings["alpha"] == 0 else f"DRIFT ({settings['mode']}, alpha {alpha:g})"
        for text, end in follow_status(lab.client, job, what):
            if end is None:
                yield text, gr.skip()
                continue
            ev, payload, el = end
            if ev == "result":
                result = payload["result"]
                how = ("already trained, reused" if result.reused else
                       f"{result.steps} steps, loss {result.losses[0]:.3f} → {result.final_loss:.3f}")
                variant = DriftRun(result, (triple["vlm"], triple["reasoner"], triple["base"]))
                yield (f"✓ **{what} done** in {el:.1f} s ({how}, on {payload['device']}). The chat's "
                       "left side now answers with it.", variant)
            elif ev == "cancelled":
                yield f"■ **{what} cancelled** ({payload}); nothing was saved.", gr.skip()
            else:
                yield f"✗ **{what} failed:** {payload}", gr.skip()

    return drift


def build(lab: Lab, models: ModelsPanel, variant_state: gr.State) -> gr.Markdown:
    gr.Markdown(ABOUT)
    # No minimum/maximum on the boxes: Gradio's own check shows an unnamed error toast (twice) and
    # logs a traceback; drift_settings names the field and its range in the status line instead.
    # the mode on a row of its own: "adaptive_cosine" does not fit half the column beside its arrow
    mode = gr.Dropdown(list(MODES), value=DRIFT_DEFAULTS["mode"], label="mode", elem_id="drift-mode",
                       info="how the gradient is bent toward the reasoner (see the Glossary)")
    with gr.Row():
        alpha = gr.Number(DRIFT_DEFAULTS["alpha"], label="alpha", info=_range("alpha"))
    with gr.Row():
        steps = gr.Number(DRIFT_DEFAULTS["steps"], label="steps", precision=0, info=_range("steps"))
        lr = gr.Number(DRIFT_DEFAULTS["lr"], label="learning rate", info=_range("lr"))
    with gr.Row():
        batch_size = gr.Number(DRIFT_DEFAULTS["batch_size"], label="batch size", precision=0,
                               info=_range("batch_size"))
        examples = gr.Number(DRIFT_DEFAULTS["examples"], label="examples", precision=0, info=_range("examples"))
    with gr.Row():
        run_btn = gr.Button("Run DRIFT", variant="primary", elem_id="drift-btn")
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="drift-cancel-btn")
    status = gr.Markdown("Set the fine-tune and press **Run DRIFT**.", elem_id="status-drift")

    inputs = [*models.inputs, mode, alpha, steps, lr, batch_size, examples]
    run_btn.click(_drift_handler(lab), inputs, [status, variant_state], api_name="drift", concurrency_limit=16)
    models.compatible.change(lambda ok: gr.update(interactive=bool(ok)), models.compatible, run_btn,
                             queue=False, api_visibility="private")

    cancel_button.wire(lab, cancel_btn, ("drift",), api_name="drift_cancel")
    return status
