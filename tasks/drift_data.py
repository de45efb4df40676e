"""Training examples for the short fine-tunes (DRIFT and plain): image + chain-of-thought
visual math items generated like the toy eval data, from combinations the eval never uses."""

from __future__ import annotations

import random

from tasks import toydata as td


def training_examples(n: int, seed: int = 0) -> list:
    """n (PIL image, question, answer) triples, none of them held out for evaluation."""
    rng = random.Random(10_000 + seed)
    out = []
    while len(out) < n:
        key, item = td.random_visual_math(rng)
        if td.is_heldout(key):
            continue
        out.append((td.render(item.scene), item.question, item.answer))
    return out
