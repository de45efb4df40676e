"""Visual-attention decay (FRANK Fig. 2) and the FRANK modality prior derived from it.

a_l = mean over images and heads of A_l(text->image) / (A_l(text->image) + A_l(text->text)):
the share of attention that text query positions put on image-token keys at decoder layer l,
from eager attention weights. Then ln a_l = ln C - beta * l is fit by least squares and the
prior is FRANK's w_v(l) = min(1, exp(-beta l)) = a_l / a_0 of the fit, w_r(l) = 1 - w_v(l)
(one implementation: merging.methods.frank.prior).

[choice] Text queries are the non-image positions *after* the first image token: under causal
masking the positions before it cannot see the image at all, so they would only add zeros that
depend on the prompt template, not on the model.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import torch
from PIL import Image

from merging.errors import LabError
from merging.loading import has_template, prompt, user_turn
from merging.methods import frank

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy" / "samples"
# In the toy family's closed vocabulary, and a natural request for any VLM.
DEFAULT_QUESTION = "describe the image ."


def image_token_id(config) -> int:
    for key in ("image_token_id", "image_token_index"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    raise LabError(f"{type(config).__name__} names no image token (image_token_id / image_token_index)")


def text_query_mask(input_ids: torch.Tensor, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_image [B, T], is_text_query [B, T]) for a batch of token ids."""
    is_image = input_ids == image_id
    seen_image = torch.cumsum(is_image.long(), dim=-1) > 0
    return is_image, seen_image & ~is_image


def layer_shares(attentions, input_ids: torch.Tensor, image_id: int) -> list[list[float]]:
    """Per batch item, per layer: mean over heads and text queries of the image share.

    attentions: one [B, H, T, T] tensor per decoder layer (output_attentions=True, eager).
    The share is normalised per query over image + text keys (the two add up to the query's
    whole row, so the normalisation only matters when attention rows do not sum to 1).
    """
    is_image, is_query = text_query_mask(input_ids, image_id)
    out = []
    for b in range(input_ids.shape[0]):
        q, img = is_query[b], is_image[b]
        if not img.any():
            raise LabError("the model input holds no image tokens; cannot measure attention to the image")
        if not q.any():
            raise LabError("the prompt has no text after the image; put the question after the image")
        per_layer = []
        for a in attentions:
            rows = a[b][:, q, :].float()  # [H, Q, T]
            to_img = rows[..., img].sum(-1)
            to_txt = rows[..., ~img].sum(-1)
            per_layer.append(float((to_img / (to_img + to_txt)).mean()))
        out.append(per_layer)
    return out


@torch.no_grad()
def measure_shares(model, inputs: list[dict], image_id: int, progress=None) -> list[float]:
    """a_l averaged over the given model inputs (one dict per image)."""
    if not inputs:
        raise LabError("no images to measure attention on")
    per_image = []
    for i, batch in enumerate(inputs):
        if progress:
            progress(i, len(inputs), f"attention: image {i + 1}/{len(inputs)}")
        out = model(**batch, output_attentions=True, use_cache=False)
        if not out.attentions or out.attentions[0] is None:
            raise LabError("the model returned no attention weights; load it with attn_implementation='eager'")
        per_image.extend(layer_shares(out.attentions, batch["input_ids"], image_id))
    if progress:
        progress(len(inputs), len(inputs), "attention: done")
    n_layers = len(per_image[0])
    return [sum(img[i] for img in per_image) / len(per_image) for i in range(n_layers)]


def fit_decay(shares: list[float]) -> dict:
    """Least-squares fit of ln a_l = ln C - beta * l; returns {"beta", "C", "r2"}."""
    if len(shares) < 2:
        return {"beta": 0.0, "C": float(shares[0]) if shares else 1.0, "r2": float("nan")}
    x = torch.arange(len(shares), dtype=torch.float64)
    # Clamp: a share of exactly 0 (image never attended) has no logarithm.
    y = torch.tensor(shares, dtype=torch.float64).clamp_min(1e-12).log()
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    intercept = float(ym) - slope * float(xm)
    resid = y - (intercept + slope * x)
    ss_tot = float(((y - ym) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"beta": -slope, "C": math.exp(intercept), "r2": r2}


# ----------------------------------------------------------------------------- images and inputs
def load_images(images=None, limit: int | None = None) -> list:
    """PIL images from paths / PIL images, or the bundled toy samples when images is None."""
    if images is None:
        paths = sorted(SAMPLES_DIR.glob("*.png")) if SAMPLES_DIR.is_dir() else []
        if not paths:
            raise LabError(f"no images given and no bundled samples in {SAMPLES_DIR}")
        images = paths
    out = []
    for im in images:
        if isinstance(im, (str, Path)):
            try:
                with Image.open(im) as f:
                    out.append(f.convert("RGB"))
            except (OSError, ValueError) as e:
                raise LabError(f"cannot read image {im}: {e}") from None
        else:
            out.append(im.convert("RGB"))
    return out[:limit] if limit else out


def images_key(images: list) -> str:
    """Content hash of the images (for the cache key)."""
    h = hashlib.sha256()
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        h.update(hashlib.sha256(buf.getvalue()).digest())
    return h.hexdigest()[:24]


def build_inputs(processor, images: list, question: str = DEFAULT_QUESTION, device="cpu") -> list[dict]:
    """One processor call per image, on merging.loading's prompt (the chat template when there is one)."""
    text = prompt(processor, [user_turn(question, image=True)])
    # A chat template already writes the BOS token; do not add a second one.
    special = not has_template(processor)
    out = []
    for im in images:
        enc = processor(images=im, text=text, return_tensors="pt", add_special_tokens=special)
        out.append({k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out


def attention_decay(model, processor, images=None, question: str = DEFAULT_QUESTION, limit: int | None = 16,
                    device="cpu", progress=None) -> dict:
    """The whole analysis on a loaded VLM: shares per layer, the fit and the FRANK prior."""
    imgs = load_images(images, limit)
    inputs = build_inputs(processor, imgs, question, device)
    shares = measure_shares(model, inputs, image_token_id(model.config), progress)
    fit = fit_decay(shares)
    w_v = frank.prior(fit["beta"], len(shares))
    return {"shares": shares, **fit, "prior_v": w_v, "prior_r": [1.0 - w for w in w_v],
            "n_images": len(imgs), "question": question}
