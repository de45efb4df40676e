"""The one training loop: next-token loss on the target tokens, AdamW, warmup + cosine, seeded.

A stage is described by a `make_batch(rng) -> dict` function (input_ids, attention_mask, labels,
optionally pixel_values) and parameter groups with their own learning rates; parameters outside
the groups are frozen.
"""

from __future__ import annotations

import math
import random
import time

import torch

from tools.toy.models import NUM_IMAGE_TOKENS
from tools.toy.vocab import IMAGE, PAD

IGNORE = -100


def encode(tokenizer, prompt: str, target: str | None) -> tuple[list[int], list[int]]:
    """ids and labels; with no target (pretraining text) every token is a target."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if target is None:
        return ids, list(ids)
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    return ids + tgt, [IGNORE] * len(ids) + tgt


def expand_image(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Repeat the one <image> id as many times as the processor does."""
    out_ids, out_labels = [], []
    for i, lab in zip(ids, labels):
        n = NUM_IMAGE_TOKENS if i == IMAGE else 1
        out_ids += [i] * n
        out_labels += [IGNORE if i == IMAGE else lab] * n
    return out_ids, out_labels


def collate(pairs: list[tuple[list[int], list[int]]]) -> dict:
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, make_batch, groups: list[dict], steps: int, seed: int, warmup: int = 50, log=print, name=""):
    """Train the parameters in `groups` ([{"params": [...], "lr": float}]) for `steps` steps."""
    trainable = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)
    base_lrs = [g["lr"] for g in groups]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    start, running = time.time(), None
    log(f"[{name}] {steps} steps on {torch.get_num_threads()} thread(s)")
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * _lr_factor(step, steps, min(warmup, max(1, steps // 5)))
        loss = model(**make_batch(rng)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"[{name}] step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
