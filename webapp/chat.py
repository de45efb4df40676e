"""Answer one chat turn with a loaded (V)LM, streaming text pieces as they are generated (worker side)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from webapp.jobs import Cancelled


def _tokenizer_of(proc):
    return getattr(proc, "tokenizer", proc)


def build_messages(history: list[dict], question: str, has_image: bool) -> list[dict]:
    """Chat-template messages: earlier text turns (if any) then the question, image first."""
    messages = []
    for turn in history:
        messages.append({"role": "user", "content": [{"type": "text", "text": turn["question"]}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": content})
    return messages


def _prompt(proc, messages: list[dict]) -> str:
    for obj in (proc, _tokenizer_of(proc)):
        if getattr(obj, "chat_template", None):
            return obj.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No chat template at all: plain text, so that a bare LM still answers something.
    last = messages[-1]["content"]
    return " ".join(c["text"] for c in last if c["type"] == "text")


def stream_answer(model, proc, question: str, image=None, history: list[dict] | None = None,
                  max_new_tokens: int = 48, temperature: float = 0.0,
                  on_text: Callable[[str], None] | None = None,
                  cancelled: Callable[[], bool] | None = None) -> str:
    """Generate an answer; on_text(piece) is called for each decoded piece. Returns the full text."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tok = _tokenizer_of(proc)
    has_image = image is not None and hasattr(model.config, "vision_config")
    prompt = _prompt(proc, build_messages(history or [], question, has_image))
    if has_image:
        inputs = proc(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tok([prompt], return_tensors="pt", add_special_tokens=False)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return bool(cancelled and cancelled())

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=int(max_new_tokens),
                  stopping_criteria=StoppingCriteriaList([_Stop()]),
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=0.95)
    else:
        kwargs.update(do_sample=False)
    failure: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        if piece:
            text += piece
            if on_text:
                on_text(piece)
    thread.join()
    if failure:
        raise failure[0]
    if cancelled and cancelled():
        raise Cancelled("stopped")
    return text.strip()
