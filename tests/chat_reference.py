"""Independent chat answers for the app tests: plain greedy generate() of from_pretrained models.

The original VLM is its checkpoint; a recipe's weights are the folder the streaming engine writes
for it (merging.engine.merge_to_disk), not the worker's in-place merge.
"""

from __future__ import annotations

import re

import yaml

TOKENS = 8  # few tokens: fast, and already enough for merged and original answers to differ


def answer_text(message: dict) -> str:
    """The text of a chat message as gradio_client returns it (a string or a list of parts)."""
    c = message["content"]
    parts = c if isinstance(c, list) else [c]
    text = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts).strip()
    return re.sub(r"\s*<sub>answered by: [^<]*</sub>$", "", text)  # the pane's label, not the model's words


class Reference:
    """Greedy answers of plain from_pretrained models: the checkpoint, or a recipe's streamed merge."""

    def __init__(self, toy_dir, tmp):
        import torch
        from transformers import AutoProcessor

        torch.set_num_threads(1)  # as the app's worker (--threads 1): same reduction order
        self.vlm, self.tmp = toy_dir / "vlm", tmp
        self.tok = AutoProcessor.from_pretrained(self.vlm).tokenizer
        self.proc = AutoProcessor.from_pretrained(self.vlm)
        self.models, self.answers = {}, {}

    def _model(self, recipe: dict | None):
        import torch
        from transformers import AutoModelForImageTextToText

        from merging.engine import merge_to_disk
        from merging.recipe import from_dict

        key = yaml.safe_dump(recipe, sort_keys=True) if recipe else None
        if key not in self.models:
            folder = self.vlm
            if recipe:
                folder = self.tmp / f"merge{len(self.models)}"
                merge_to_disk(from_dict(recipe), folder)
            self.models[key] = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        return self.models[key]

    def answer(self, recipe: dict | None, question: str) -> str:
        key = (yaml.safe_dump(recipe, sort_keys=True) if recipe else None, question)
        if key not in self.answers:
            messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
            prompt = self.proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc = self.tok([prompt], return_tensors="pt", add_special_tokens=False)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
            out = self._model(recipe).generate(**enc, max_new_tokens=TOKENS, do_sample=False, pad_token_id=pad)
            text = self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            self.answers[key] = text or "(empty answer)"  # what the chat panel shows for ""
        return self.answers[key]
