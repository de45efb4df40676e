"""The one loader of a VLM or text LLM (model + processor or tokenizer), and the one prompt builder.

Every part that runs a model goes through load_model: evaluation, the attention and knockout
analyses, the app's worker (chat, merges in place) and the DRIFT fine-tune. A model's own Python
code (config `auto_map`) runs only when trust_remote_code is set, which only the app's
--trust-remote-code does.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from merging.errors import LabError
from merging.hub import resolve
from merging.processors import check_torchvision, first_line, load_processor


def serving_dtype(device: str, cpu_dtype: str = "float32") -> str:
    """On the CPU float32 unless bfloat16 is asked for (bf16 matmuls there are slower and lossy,
    but halve the memory); the checkpoint's own elsewhere."""
    return cpu_dtype if torch.device(device).type == "cpu" else "auto"


def is_vision(config) -> bool:
    return hasattr(config, "vision_config")


def load_model(ref: str | Path, device: str = "cpu", *, attentions: bool = False, dtype: str = "float32",
               trust_remote_code: bool = False):
    """(model in eval mode on `device`, processor for a VLM or tokenizer for an LLM).

    ref: a folder or a cached hub id. attentions: eager attention, the only implementation that
    returns attention weights. dtype: "float32", "bfloat16", ... or "auto" (the checkpoint's).
    """
    check_torchvision()  # a broken one breaks every transformers import below, with an unhelpful message
    # Every CLI and the app's worker import this module; only loading a model needs transformers.
    # lazy: transformers' model classes cost 1.4 s after torch (4.6 s cold), python -X importtime.
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    path = resolve(ref)
    if not (path / "config.json").is_file():
        raise LabError(f"not a model folder (no config.json): {path}")
    trust = bool(trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise LabError(f"{ref} needs its own Python code to load (auto_map in config.json); the lab runs "
                       "such code only when started with --trust-remote-code") from None
    vision = is_vision(config)
    kw = {"attn_implementation": "eager"} if attentions else {}
    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if torch.device(device).type != "cpu":
        # Straight onto the device, tensor by tensor: never a whole copy in host RAM first.
        kw["device_map"] = {"": device}
    model = cls.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust, **kw).eval()
    if torch.device(device).type == "cpu":
        model = model.to(device)
    if vision:  # its own, or the lab's image-only one where the family's needs a missing torchvision
        return model, load_processor(path, getattr(config, "model_type", ""), trust)
    try:
        return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except Exception as e:
        raise LabError(f"could not load the model in {ref}: no usable tokenizer ({type(e).__name__}: "
                       f"{first_line(e)})") from None


@contextmanager
def eager_attention(model):
    """A loaded model switched to eager attention (it returns attention weights) for the block."""
    before = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before and before != "eager":
            model.set_attn_implementation(before)


# ------------------------------------------------------------------------------------- prompts
def tokenizer_of(proc):
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(proc, "tokenizer", proc)


def user_turn(question: str, image: bool) -> dict:
    """One user message in the chat-template format, the image first."""
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]}


def has_template(proc) -> bool:
    return any(getattr(obj, "chat_template", None) for obj in (proc, tokenizer_of(proc)))


def prompt(proc, messages: list[dict]) -> str:
    """The generation prompt of `messages`: the processor's chat template, else the tokenizer's.
    Without any template, the last turn's text (after the image token if it has an image), so a
    bare LM still answers something."""
    for obj in (proc, tokenizer_of(proc)):
        if getattr(obj, "chat_template", None):
            return obj.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    last = messages[-1]["content"]
    text = " ".join(c["text"] for c in last if c["type"] == "text")
    if any(c["type"] == "image" for c in last):
        text = f"{getattr(proc, 'image_token', '<image>')} {text}"
    return text
