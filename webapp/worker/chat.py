"""Answer one chat turn with a loaded (V)LM, streaming text pieces as they are generated (worker side)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from merging.errors import LabError
from merging.loading import is_vision, prompt, tokenizer_of, user_turn
from webapp.protocol import Cancelled


def build_messages(history: list[dict], question: str, has_image: bool) -> list[dict]:
    """Chat-template messages: earlier text turns (if any) then the question, image first."""
    messages = []
    for turn in history:
        messages.append({"role": "user", "content": [{"type": "text", "text": turn["question"]}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    messages.append(user_turn(question, has_image))
    return messages


def context_length(model, tok) -> int | None:
    """Positions the language model can attend to (None when the config does not say)."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else getattr(cfg, "text_config", cfg)
    sizes = [getattr(text, "max_position_embeddings", None), getattr(tok, "model_max_length", None)]
    sizes = [int(s) for s in sizes if isinstance(s, int) and 0 < s < 10**7]
    return min(sizes) if sizes else None


def _encode(proc, tok, question, history, image):
    has_image = image is not None
    text = prompt(proc, build_messages(history, question, has_image))
    if has_image:
        return proc(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
    return tok([text], return_tensors="pt", add_special_tokens=False)


def fit_inputs(model, proc, question: str, image=None, history: list[dict] | None = None,
               max_new_tokens: int = 48) -> tuple[dict, int, list[str]]:
    """(inputs, max_new_tokens, notices): the prompt cut to the model's context, leaving room to answer.

    Earlier turns go first (oldest first), then the question is cut at its end; the image is kept.
    LabError when even the image alone does not fit.
    """
    tok = tokenizer_of(proc)
    history = list(history or [])
    ctx = context_length(model, tok)
    inputs = _encode(proc, tok, question, history, image)
    if ctx is None:
        return inputs, max_new_tokens, []
    notices = []
    if max_new_tokens > ctx // 2:
        notices.append(f"max new tokens lowered from {max_new_tokens} to {ctx // 2}: the model's context "
                       f"is {ctx} tokens")
        max_new_tokens = ctx // 2
    budget = ctx - max_new_tokens
    length = inputs["input_ids"].shape[1]
    dropped = 0
    while length > budget and history:
        history.pop(0)
        dropped += 1
        inputs = _encode(proc, tok, question, history, image)
        length = inputs["input_ids"].shape[1]
    if dropped:
        notices.append(f"{dropped} earlier turn(s) left out to fit the model's context of {ctx} tokens")
    ids = tok(question, add_special_tokens=False)["input_ids"]
    original, margin = len(ids), 2
    while length > budget:
        keep = len(ids) - (length - budget) - margin
        if keep < 1:
            raise LabError(f"the prompt does not fit: without the question it already takes "
                           f"{length - len(ids)} tokens of this model's {ctx}-token context")
        ids = ids[:keep]
        question = tok.decode(ids, skip_special_tokens=True)
        inputs = _encode(proc, tok, question, history, image)
        length, margin = inputs["input_ids"].shape[1], margin * 2
    if len(ids) < original:
        notices.append(f"the question was cut from {original} to {len(ids)} tokens to fit the model's "
                       f"context of {ctx} tokens ({max_new_tokens} kept for the answer)")
    return inputs, max_new_tokens, notices


def stream_answer(model, proc, question: str, image=None, history: list[dict] | None = None,
                  max_new_tokens: int = 48, temperature: float = 0.0,
                  on_text: Callable[[str], None] | None = None,
                  cancelled: Callable[[], bool] | None = None,
                  on_notice: Callable[[str], None] | None = None,
                  on_logits: Callable[[list[int], tuple], None] | None = None) -> str:
    """Generate an answer; on_text(piece) is called for each decoded piece, on_notice(text) for each
    way the prompt had to be cut to fit the context, on_logits(new token ids, generate's raw logits of
    each step) once at the end. Returns the full text."""
    # The UI process imports this module (webapp.ui.client -> webapp.worker.process) and never generates.
    # lazy: transformers' generation classes cost 1.0 s after torch (python -X importtime).
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    tok = tokenizer_of(proc)
    image = image if image is not None and is_vision(model.config) else None
    inputs, max_new_tokens, notices = fit_inputs(model, proc, question, image, history, max_new_tokens)
    for n in notices:
        if on_notice:
            on_notice(n)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return bool(cancelled and cancelled())

    pieces: list[str] = []

    class _Pieces(TextStreamer):
        """Each decoded piece to on_text, in generate's own thread: generating in a second thread
        gives torch a second OpenMP team, and on a few cores the two teams' spinning made every
        answer about a third slower than a plain generate."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)

    kwargs = dict(**inputs, streamer=_Pieces(tok, skip_prompt=True, skip_special_tokens=True),
                  max_new_tokens=int(max_new_tokens), stopping_criteria=StoppingCriteriaList([_Stop()]),
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=0.95)
    else:
        kwargs.update(do_sample=False)
    if on_logits:  # the scores of the same forward passes that chose each token (analysis.key_tokens)
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**kwargs)
    if on_logits and not (cancelled and cancelled()):
        on_logits(out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits)
    text = "".join(pieces)
    if cancelled and cancelled():
        raise Cancelled("stopped")
    return text.strip()
