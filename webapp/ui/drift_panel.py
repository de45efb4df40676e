"""The "DRIFT" panel: a short fine-tune of the VLM steered toward the reasoner, then chat with it (UI side).

The training data is an upload in the Evaluate tab's format (a JSONL with its images, or one zip;
gathered by webapp.ui.eval_upload and checked whole here, so a bad line is named before the worker queue
is joined); without one the bundled toy family trains on its toy scenes and any other VLM is refused.
The worker trains into <cache-dir>/drift/<hash of the models, the settings and the data's content>
(reused when it exists) and keeps the result loaded; this tab's chat then answers with it on the
"merged" side until the next merge or run.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from analysis.eval_file import check_items
from merging.drift import DRIFT_DEFAULTS, DRIFT_KEYS, MODES, drift_settings
from merging.errors import LabError
from merging.finetune import is_toy_family
from webapp.protocol import DriftRun
from webapp.ui import cancel_button, eval_upload
from webapp.ui.eval_upload import EvalSet
from webapp.ui.lab import Lab, follow_status, session_of
from webapp.ui.models_panel import ModelsPanel, check
from webapp.ui.variants import variant_label

ABOUT = ("_DRIFT fine-tunes the VLM's language model for a few steps, steering each gradient toward the "
         "reasoner (D = W_reasoner - W_vlm); alpha 0 is a plain fine-tune._")
DATA_HELP = ("**Training data**: a `.jsonl` with its images, or one `.zip` holding both, in the Evaluate tab's "
             'format: one `{"question", "answer", "image"}` a line, the image path relative to the JSONL. DRIFT '
             "trains on its first **examples** items. Without a file the bundled toy family trains on its toy "
             "scenes; any other VLM needs your data.")
LIVE = " The chat's left side now answers with it."
NO_FILE = "_No file: the toy scenes (bundled toy family only)._"


def _range(name: str) -> str:
    lo, hi = DRIFT_KEYS[name]
    return f"{lo:g} to {hi:g}"


def _stage(lab: Lab, files) -> tuple[EvalSet, int]:
    """The uploads gathered into one folder of this server's uploads (webapp.ui.eval_upload) and checked
    whole (headers only); (the set, its item count). LabError for what cannot be used."""
    paths = [f if isinstance(f, str) else getattr(f, "name", None) or f.get("path") for f in files]
    upload_dir = Path(lab.read_roots[0])
    upload_dir.mkdir(parents=True, exist_ok=True)
    es = eval_upload.stage([p for p in paths if p], lab.read_roots, upload_dir)
    try:
        return es, len(check_items(es.jsonl, es.by_name, es.name))
    except BaseException:
        eval_upload.unstage(upload_dir, es.jsonl)
        raise


def _count_handler(lab: Lab):
    def drift_data(files):
        """How many items the uploaded training set holds (every line checked, as the run will)."""
        if not files:
            return NO_FILE
        try:
            es, n = _stage(lab, files)
        except LabError as e:
            return f"✗ {e}"
        eval_upload.unstage(Path(lab.read_roots[0]), es.jsonl)  # only counted: a run stages its own copy
        return f"✓ **{n} items** read from `{es.name}` (every line checked)."

    return drift_data


def _data_args(lab: Lab, files, vlm: str, examples: int) -> tuple[dict, str]:
    """The drift job's data arguments (the settings' data path, how to find its images, its name)
    and how the status names the data; LabError for a bad upload, or for no upload with a VLM the
    toy scenes mean nothing to."""
    if not files:
        if not is_toy_family(vlm):
            raise LabError(f"{Path(vlm).name or vlm} is not the bundled toy family: upload your training data "
                           "(a .jsonl with its images, or one .zip) above")
        return {"data": None}, "the toy scenes"
    es, n = _stage(lab, files)
    used = f"the first {examples} of the {n} items" if examples < n else f"the {n} items"
    return {"data": str(es.jsonl), "data_by_name": es.by_name, "data_name": es.name}, f"{used} of `{es.name}`"


def _done(what: str, result, el: float, device: str, data: str) -> str:
    how = ("already trained, reused" if result.reused else
           f"{result.steps} steps, loss {result.losses[0]:.3f} → {result.final_loss:.3f}")
    return f"✓ **{what} done** in {el:.1f} s ({how}, on {device}), trained on {data}.{LIVE}"


def live_status(variant, text: str):
    """The status once the chat's left side answers with something else (a later merge, or nothing):
    the run's line stays, its claim to be live goes."""
    if isinstance(variant, DriftRun) or not (text or "").endswith(LIVE):
        return gr.skip()
    now = f"the merge {variant_label(variant)}" if variant else "nothing (no merge in this tab)"
    return text[:-len(LIVE)] + f"\n\n_The chat's left side no longer answers with it: {now} replaced it._"


def parse_layers(text: str | None) -> list[int] | None:
    """The layers box: empty is the whole language model; "20-27", "20, 27" or "20 27" a range; "5" one layer."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [x for x in re.split(r"[\s,\-–]+", text) if x]
    if not 1 <= len(parts) <= 2 or not all(x.isdigit() for x in parts):
        raise LabError(f"drift layers: write first-last, e.g. 20-27 (empty: the whole language model), got {text!r}")
    return drift_settings({"layers": [int(parts[0]), int(parts[-1])]})["layers"]


def _drift_handler(lab: Lab):
    def drift(preset, vlm, reasoner, base, mode, alpha, steps, lr, batch_size, examples, files=None, layers="",
              request: gr.Request = None):
        """Fine-tune the triple's VLM (DRIFT, or plain at alpha 0) on the uploaded set (the toy scenes
        for the bundled family without one); chat then uses the result."""
        try:
            rep, triple = check(lab, preset, vlm, reasoner, base)
            rep.raise_if_incompatible()
            typed = {"alpha": alpha, "steps": steps, "lr": lr, "batch_size": batch_size, "examples": examples}
            empty = [k for k, v in typed.items() if v is None]
            if empty:
                raise LabError(f"drift {empty[0]}: enter a number ({_range(empty[0])})")
            span = parse_layers(layers)
            settings = drift_settings({"mode": mode, **typed, **({"layers": span} if span else {})})
            data, shown = _data_args(lab, files, triple["vlm"], int(settings["examples"]))
        except (LabError, TypeError, ValueError) as e:
            yield f"✗ **Cannot run DRIFT:** {e}", gr.skip()
            return
        args = {"vlm": triple["vlm"], "reasoner": triple["reasoner"], "drift": {**settings, "data": data.pop("data")},
                **data}
        job = lab.client.submit("drift", args, session_of(request))
        what = "Plain fine-tune" if settings["alpha"] == 0 else f"DRIFT ({settings['mode']}, alpha {alpha:g})"
        what += f" of layers {span[0]}-{span[1]}" if span else ""
        try:
            for text, end in follow_status(lab.client, job, what):
                if end is None:
                    yield text, gr.skip()
                    continue
                ev, payload, el = end
                if ev == "result":
                    variant = DriftRun(payload["result"], (triple["vlm"], triple["reasoner"], triple["base"]))
                    yield _done(what, payload["result"], el, payload["device"], shown), variant
                elif ev == "cancelled":
                    yield f"■ **{what} cancelled** ({payload}); nothing was saved.", gr.skip()
                else:
                    yield f"✗ **{what} failed:** {payload}", gr.skip()
        finally:  # the staged upload served this run only (a rerun of the same files stages them again)
            if args["drift"].get("data"):
                eval_upload.unstage(Path(lab.read_roots[0]), args["drift"]["data"])

    return drift


def build(lab: Lab, models: ModelsPanel, variant_state: gr.State) -> tuple[gr.Markdown, gr.Markdown]:
    """The panel; (its status line, its walkthrough outcome line)."""
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
    layers = gr.Textbox("", label="layers that train", placeholder="empty: the whole language model", max_lines=1,
                        elem_id="drift-layers", info="first-last decoder layers, e.g. 20-27: a 7B VLM trains on one "
                        "card only this way (the memory plan says what a fine-tune holds)")
    gr.Markdown(DATA_HELP, elem_id="drift-data-help")
    files = gr.File(file_count="multiple", file_types=[".jsonl", ".json", ".zip", "image"], type="filepath",
                    label=".jsonl + images, or one .zip", elem_id="drift-files", height=180)
    data_status = gr.Markdown(NO_FILE, elem_id="drift-data-status")
    with gr.Row():
        run_btn = gr.Button("Run DRIFT", variant="primary", elem_id="drift-btn")
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="drift-cancel-btn")
    status = gr.Markdown("Set the fine-tune and press **Run DRIFT**.", elem_id="status-drift")
    outcome = gr.Markdown("", elem_id="drift-outcome")

    files.change(_count_handler(lab), files, data_status, api_name="drift_data")
    inputs = [*models.inputs, mode, alpha, steps, lr, batch_size, examples, files, layers]
    run_btn.click(_drift_handler(lab), inputs, [status, variant_state], api_name="drift", concurrency_limit=16)
    models.compatible.change(lambda ok: gr.update(interactive=bool(ok)), models.compatible, run_btn,
                             queue=False, api_visibility="private")

    variant_state.change(live_status, [variant_state, status], status, queue=False, api_visibility="private",
                         show_progress="hidden")
    cancel_button.wire(lab, cancel_btn, ("drift",), api_name="drift_cancel")
    return status, outcome
