"""An image-only processor for Mistral3 (Pixtral's image layout) that needs no torchvision.

Pixtral lays an image out as rows of image tokens: one `[IMG]` per patch of side
patch_size * spatial_merge_size (what one token of the language model stands for after the
projector merges spatial_merge_size^2 vision patches), `[IMG_BREAK]` after each row, and
`[IMG_END]` instead of the last row's break. The image processor (its PIL version) resizes the
image to whole patches of that side, so the counts above are the model's feature count exactly.
Saved, it writes the files transformers' own PixtralProcessor loads.
"""

from __future__ import annotations

import json
from pathlib import Path


def _side(patch) -> int:
    return int(patch["height"] if isinstance(patch, dict) else patch)


class ImageOnlyPixtralProcessor:
    """processor(images=..., text=...) -> input_ids, attention_mask, pixel_values, image_sizes."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None, settings: dict):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.patch_size = _side(settings.get("patch_size") or image_processor.patch_size)
        self.spatial_merge_size = int(settings.get("spatial_merge_size", 1))
        self.image_token = settings.get("image_token", "[IMG]")
        self.image_break_token = settings.get("image_break_token", "[IMG_BREAK]")
        self.image_end_token = settings.get("image_end_token", "[IMG_END]")

    def image_tokens(self, height: int, width: int) -> str:
        """The text one image of this (resized) size stands for."""
        side = self.patch_size * self.spatial_merge_size
        rows, cols = height // side, width // side
        text = ((self.image_token * cols + self.image_break_token) * rows)
        return text[: -len(self.image_break_token)] + self.image_end_token

    def __call__(self, images=None, text=None, return_tensors=None, add_special_tokens=True, padding=False,
                 **kwargs):
        # lazy: transformers' BatchFeature, imported only when a model runs.
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        data = {}
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            images = [im for x in images for im in (x if isinstance(x, (list, tuple)) else [x])]  # per-sample lists
            side = self.patch_size * self.spatial_merge_size
            pix = self.image_processor(images, patch_size={"height": side, "width": side}, return_tensors="pt")
            data.update(pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"])
            sizes = iter(pix["image_sizes"].tolist())
            wanted = sum(t.count(self.image_token) for t in texts)
            if wanted != len(images):  # the model would fail later, on a count it does not explain
                raise ValueError(f"the text holds {wanted} {self.image_token} token(s) for {len(images)} image(s)")
            placeholder = "\0image\0"  # the expanded rows hold [IMG] too: mark the places first, expand each once
            texts = [t.replace(self.image_token, placeholder) for t in texts]
            for i, t in enumerate(texts):
                while placeholder in t:
                    t = t.replace(placeholder, self.image_tokens(*next(sizes)), 1)
                texts[i] = t
        enc = self.tokenizer(texts, return_tensors=return_tensors, add_special_tokens=add_special_tokens,
                             padding=padding)
        return BatchFeature({**enc, **data}, tensor_type=return_tensors)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, folder) -> None:
        """The files transformers' PixtralProcessor reads: tokenizer, image processor, processor
        settings and the chat template."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        settings = {"processor_class": "PixtralProcessor", "patch_size": self.patch_size,
                    "spatial_merge_size": self.spatial_merge_size, "image_token": self.image_token,
                    "image_break_token": self.image_break_token, "image_end_token": self.image_end_token}
        (folder / "processor_config.json").write_text(json.dumps(settings, indent=1) + "\n")
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)
