"""The "Chat" panel: ask the merged model and the original VLM (or another model this tab made: see
webapp.ui.compare_picker) side by side, streamed (UI side).

The session's own history lives in a gr.State (never shared between tabs); each request carries
the recipe this tab merged (or its last DRIFT run, a protocol.DriftRun, whichever came last) and the
model picked for the right pane, so the worker answers with those even if another tab merged since.
"""

from __future__ import annotations

import json

import gradio as gr

from merging.errors import LabError
from merging.layout import ROLES
from webapp.presets import TOY_ROOT
from webapp.protocol import DriftRun, triple_of
from webapp.safety import cap_question, check_image, uploaded
from webapp.ui.chat_insight import insight_view, warning_markdown
from webapp.ui.lab import Lab, made_of, session_of
from webapp.ui.models_panel import ModelsPanel
from webapp.ui.variants import right_title, variant_label

SAMPLES = TOY_ROOT / "samples"
NO_MERGE = "_No merge yet in this tab: press **Merge** (or **Run DRIFT**) to chat with the result._"
DEFAULT_MAX_NEW = 48
# The examples offered, measured on the bundled family (greedy; the VLM vs the app's default merge,
# task_arithmetic alpha 1; `python -m analysis ask MODEL --image IMG "QUESTION" --why`): both answer the
# count on sample_0; only the merge does the arithmetic on the others (sample_1: VLM "8", merge "8 - 7 = 1";
# sample_4: VLM "5", merge "6 - 5 = 1"; sample_3: VLM no answer, merge "4 + 6 = 10"). sample_2's "what
# color are the triangles ?" is not offered: both answer "yellow" (the triangles are red), no merge at work.
SHOWCASE = (("sample_0.png", "how many squares are there ?"),
            ("sample_1.png", "7 circles are taken away . how many circles are left ?"),
            ("sample_4.png", "5 triangles are taken away . how many triangles are left ?"),
            ("sample_3.png", "6 more triangles are added . how many triangles now ?"))


def pane_updates(variant):
    """The left pane's title and empty-pane text for what answers there now."""
    label = variant_label(variant)
    if label is None:
        return gr.update(label="Merged model (none yet)", placeholder=NO_MERGE)
    title = "DRIFT model" if isinstance(variant, DriftRun) else "Merged model"
    return gr.update(label=f"{title}: {label}", placeholder=f"_{title} ready ({label}): ask a question below._")


def examples(limit: int = 4) -> list[dict]:
    """MultimodalTextbox values for the bundled samples (image + question)."""
    index = SAMPLES / "samples.json"
    if not index.is_file():
        return []
    try:
        items = json.loads(index.read_text())
    except json.JSONDecodeError:
        return []
    if isinstance(items, dict):
        items = items.get("samples", [])
    out = []
    for it in items:
        img = SAMPLES / it["image"] if it.get("image") else None
        out.append({"text": it["question"], "files": [str(img)] if img and img.is_file() else []})
    shown = [m for image, q in SHOWCASE for m in out if m["text"] == q and m["files"]
             and m["files"][0].endswith(image)]
    if len(shown) == len(SHOWCASE):  # the bundled family's samples
        return (shown + [m for m in out if not m["files"]])[:limit]
    # Another family's samples: one question per image, alternating perception and math, then text-only ones.
    images = list(dict.fromkeys(tuple(m["files"]) for m in out if m["files"]))
    picked = []
    for i, img in enumerate(images):
        same = [m for m in out if tuple(m["files"]) == img]
        picked.append(same[i % len(same)])
    return (picked + [m for m in out if not m["files"]])[:limit]


def render(turns: list[dict], which: str) -> list[dict]:
    msgs = []
    for t in turns:
        if t.get("image"):
            msgs.append({"role": "user", "content": {"path": t["image"]}})
        msgs.append({"role": "user", "content": t["question"]})
        if warning := warning_markdown(t.get("check")):  # said before the answer: words it cannot read
            msgs.append({"role": "assistant", "content": warning})
        answer = t.get(which) or "…"
        if t.get("notice") and t.get(which):
            answer = f"{answer}\n\n_Note: {t['notice']}_"
        by = t.get(f"{which}_by")
        if by and t.get(which):
            answer = f"{answer}\n\n<sub>answered by: {by}</sub>"
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _views(turns: list[dict], clear_box: bool = False):
    """The chat's outputs: both panes, the text box (cleared, or left as it is) and the session's turns."""
    return render(turns, "merged"), render(turns, "original"), None if clear_box else gr.skip(), turns


def _message_parts(message) -> tuple[str, str | None]:
    """(question text, image path or None) of a MultimodalTextbox value."""
    message = message or {}
    if not isinstance(message, dict):
        return str(message).strip(), None
    files = message.get("files") or []
    image = files[0] if files else None
    return (message.get("text") or "").strip(), image.get("path") if isinstance(image, dict) else image


def _stream(lab: Lab, job, turns: list[dict], turn: dict, notes: list[str], merged_too: bool):
    """Fill this turn from the worker's events, yielding the panes after each one."""
    try:
        for kind, payload in lab.client.follow(job):
            if kind == "token":
                turn[payload["stream"]] += payload["text"]
            elif kind == "notice":
                notes.append(payload)
                turn["notice"] = " · ".join(notes)
            elif kind == "partial":  # the question check, before any answer
                turn["check"] = payload.get("check")
            elif kind == "result":
                for k, v in payload.get("answers", {}).items():
                    turn[k] = v or "(empty answer)"
                turn["keys"], turn["check"] = payload.get("keys") or {}, payload.get("check") or turn.get("check")
            elif kind in ("error", "cancelled"):
                key = "merged" if merged_too and not turn["original"] else "original"
                turn[key] = (turn[key] + f"\n\n_({kind}: {payload})_").strip()
            else:
                continue
            yield _views(turns)
    finally:
        if not job.done:
            lab.client.cancel(job)


def _chat_handler(lab: Lab):
    def chat(message, turns, recipe, other, preset, vlm, reasoner, base, max_new_tokens, temperature,
             remember_turns, request: gr.Request = None):
        text, image = _message_parts(message)
        turns = list(turns or [])
        if not text:  # nothing to ask: say so, rather than nothing happening
            gr.Warning("Add a question about the image first." if image else
                       "Type a question first (or click an example below).")
            yield _views(turns)
            return
        text, cut = cap_question(text)
        if image:
            try:
                check_image(uploaded(image, lab.read_roots))
            except LabError as e:  # shown as this turn's answer; the image is neither kept nor echoed
                turns.append({"question": text, "image": None, "merged": f"✗ {e}", "original": f"✗ {e}"})
                yield _views(turns, clear_box=True)
                return
        history = {w: [{"question": t["question"], "answer": t.get(w) or ""} for t in turns if t.get(w)]
                   for w in ("merged", "original")} if remember_turns else {}
        turn = {"question": text, "image": image, "merged": "" if recipe else NO_MERGE, "original": "",
                "merged_by": variant_label(recipe), "original_by": variant_label(other) or "the original VLM"}
        turns.append(turn)
        if cut:
            turn["notice"] = cut
        try:
            triple = dict(zip(ROLES, triple_of(recipe))) if recipe else lab.triple(preset, vlm, reasoner, base)
        except LabError as e:
            turn["original"] = f"✗ {e}"
            yield _views(turns, clear_box=True)
            return
        args = {"recipe": recipe, "compare": other, "triple": triple, "question": text, "image": image,
                "history": history,
                "max_new_tokens": int(max_new_tokens), "temperature": float(temperature)}
        job = lab.client.submit("chat", args, session_of(request))
        yield _views(turns, clear_box=True)
        yield from _stream(lab, job, turns, turn, [cut] if cut else [], bool(recipe))

    return chat


def _wire_resets(lab: Lab, clear, reset, outs: list, recipe_state: gr.State, comparison) -> None:
    """Clear (a button, or a pane's trash icon), back to the original VLM, and the pane titles."""
    merged_bot, original_bot = outs[0], outs[1]

    def clear_all(request: gr.Request = None):
        lab.client.cancel_session(session_of(request), ("chat",))
        return [], [], None, []

    clear.click(clear_all, None, outs, api_name="clear", queue=False)
    # A pane's own trash icon clears the conversation for both panes: the turns are paired, so
    # clearing one side only would come back with the next question.
    for bot in (merged_bot, original_bot):
        bot.clear(clear_all, None, outs, api_visibility="private", queue=False)
    recipe_state.change(pane_updates, recipe_state, merged_bot, api_visibility="private", queue=False)
    comparison.follow(original_bot, lambda other: gr.update(label=right_title(other)))
    # Nothing on the worker to undo: each request names both panes' models. Dropping this tab's merge
    # makes the left pane say so.
    # queued: only a queued event's new State values fire those States' change (the sweep's knobs, the export)
    reset.click(lambda: (None, pane_updates(None)), None, [recipe_state, merged_bot], api_name="reset_to_vlm")


def build(lab: Lab, models: ModelsPanel, recipe_state: gr.State, comparison):
    """The panel; `comparison` (a compare_picker.Comparison) holds what the right pane answers with."""
    with gr.Row(equal_height=True):
        gr.Markdown("Ask about an image (the paper-clip button) or a word problem. The merged model answers on the "
                    "left, the original VLM on the right, so you can see what the reasoner's skills added. To set two "
                    "merges side by side, merge one, then the other, and pick the first here.")
        comparison.picker("chat-compare", "right pane answers with")
    with gr.Row(equal_height=True):
        merged_bot = gr.Chatbot(label="Merged model (none yet)", height=360, elem_id="chat-merged",
                                feedback_options=None, placeholder=NO_MERGE)
        original_bot = gr.Chatbot(label="Original VLM", height=360, elem_id="chat-original", feedback_options=None)
    box = gr.MultimodalTextbox(file_types=["image"], file_count="single", show_label=False, elem_id="chat-box",
                               placeholder="Type a question, attach an image with the paper clip, press Enter")
    why = gr.HTML(elem_id="chat-why")  # the last turn's question check and key-token probabilities
    with gr.Row():
        max_new = gr.Slider(1, 256, value=DEFAULT_MAX_NEW, step=1, label="max new tokens",
                            info="up to half the model's context")
        temp = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature", info="0 = greedy")
        context = gr.Checkbox(False, label="remember earlier turns", info="off: each question on its own")
        clear = gr.Button("Clear", size="sm")
        reset = gr.Button("Back to the original VLM", size="sm", elem_id="chat-reset")
    ex = examples()
    samples = gr.Examples([[m] for m in ex], inputs=[box], label="Examples from the toy family: click one to ask it",
                          examples_per_page=4) if ex else None
    turns_state = gr.State([])
    chat = _chat_handler(lab)
    chat_inputs = [box, turns_state, recipe_state, comparison.other, *models.inputs, max_new, temp, context]
    outs = [merged_bot, original_bot, box, turns_state]
    turns_state.change(insight_view, turns_state, why, api_visibility="private", queue=False)
    # always_last: a question sent (or an example clicked) while an answer streams is asked once that
    # answer ends, not dropped; it waits in the text box meanwhile
    box.submit(chat, chat_inputs, outs, api_name="chat", concurrency_limit=16, trigger_mode="always_last")
    if samples is not None:  # one click asks the example question
        samples.load_input_event.then(chat, chat_inputs, outs, api_visibility="private", concurrency_limit=16,
                                      trigger_mode="always_last")

    _wire_resets(lab, clear, reset, outs, recipe_state, comparison)
    def on_dims(dims):
        ctx = (dims or {}).get("context")
        top = max(1, ctx // 2) if ctx else 256  # chat.fit_inputs keeps half the context for the prompt
        return gr.update(maximum=top, value=min(DEFAULT_MAX_NEW, top))

    models.dims.change(on_dims, models.dims, max_new, api_visibility="private", queue=False)
    # another triple: this tab's merge (or DRIFT run) was of the old one, so the left pane drops it
    def on_triple(variant, *triple):  # the same triple picked again: the merge stays
        return (gr.skip(), gr.skip()) if made_of(lab, variant, *triple) else (None, pane_updates(None))

    models.preset.input(on_triple, [recipe_state, *models.inputs], [recipe_state, merged_bot],
                        api_visibility="private", queue=False)
    return merged_bot, original_bot
