"""`python -m analysis ask MODEL [--image IMG] "QUESTION"`: one greedy answer, and first a `warning:` line
(stderr) for each thing analysis.question_check finds: words the model reads as <unk>, a picture unlike
the toy family's, and what to ask instead. `--why` adds the key tokens' top-5 probabilities.

The answer is the only thing on stdout. Exit 0 with an answer (warnings or not); 2 with one line for
bad input (no such model or image, an empty question, an image for a text-only model)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from analysis.key_tokens import key_tokens
from analysis.question_check import check_question
from merging.device import check_device
from merging.errors import LabError
from merging.loading import is_vision, load_model, prompt, tokenizer_of, user_turn

MAX_NEW_TOKENS = 48


def add_parser(sub) -> None:
    ak = sub.add_parser("ask", help="ask a model one question (with an image), warned about words it cannot read")
    ak.add_argument("model", help="a model folder (or a hub id in the local cache)")
    ak.add_argument("question")
    ak.add_argument("--image", default=None, help="an image file the question is about")
    ak.add_argument("--why", action="store_true", help="also the top-5 probabilities at the answer's key tokens")
    ak.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    ak.add_argument("--device", default="cpu")


def _image(path: str | None):
    if path is None:
        return None
    if not Path(path).is_file():
        raise LabError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise LabError(f"--image {path}: not an image ({type(e).__name__})") from None


@torch.no_grad()
def answer(model, proc, question: str, image=None, max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, list, tuple]:
    """(the greedy answer, its new token ids, generate's logits of each step)."""
    tok = tokenizer_of(proc)
    text = prompt(proc, [user_turn(question, image is not None)])
    if image is not None:
        batch = proc(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
    else:
        batch = tok([text], return_tensors="pt", add_special_tokens=False)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    ids = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    return tok.decode(ids, skip_special_tokens=True).strip(), ids, out.logits


def _load(ref: str, device: str):
    # lazy: transformers costs 0.9 s after torch (python -X importtime), only once a model loads.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr holds the warnings and the one line of an error
    try:
        return load_model(ref, device)
    except LabError:
        raise
    except Exception as e:  # transformers raises many types for a bad config or tokenizer file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LabError(f"could not load the model in {ref}: {type(e).__name__} {first}") from None


def why_lines(rows: list[dict]) -> list[str]:
    """One line per key token: the token chosen, its probability, the top-5."""
    return [f"why: {r['role']} = {r['token']} (p {r['prob']:.2f}); top 5: "
            + ", ".join(f"{t} {p:.2f}" for t, p in r["top"]) for r in rows]


def main_ask(args) -> int:
    check_device(args.device)
    question = args.question.strip()
    if not question:
        raise LabError("the question is empty")
    if not 1 <= args.max_new_tokens <= 1024:
        raise LabError(f"--max-new-tokens {args.max_new_tokens}: give 1 to 1024")
    image = _image(args.image)
    if not Path(args.model).exists() and "/" not in args.model:
        raise LabError(f"{args.model}: no such model folder")
    model, proc = _load(args.model, args.device)
    if image is not None and not is_vision(model.config):
        raise LabError(f"{args.model} is a text-only model: it cannot read --image")
    for line in check_question(tokenizer_of(proc), question, image).lines():
        print(f"warning: {line}", file=sys.stderr)
    text, ids, logits = answer(model, proc, question, image, args.max_new_tokens)
    print(text)
    if args.why:
        for line in why_lines(key_tokens(tokenizer_of(proc), ids, logits)):
            print(line, file=sys.stderr)
    return 0
