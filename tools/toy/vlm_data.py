"""Image + question training examples for the VLM stage: perception only, no arithmetic."""

from __future__ import annotations

import random

from tasks import toydata as td

KINDS = (*td.PERCEPTION_KINDS, "describe", "verify")
VERIFY = 0.3  # share of verify questions, whose number is often not the count (a distractor)


def vlm_example(rng: random.Random, compare: float = 0.0):
    """(PIL image, prompt, answer). Scenes come from the training rng; eval uses its own seeds.
    A share `compare` are comparisons ("are there more than 5 circles ?": a statement, one step, the
    answer), the toy's counterpart of the reasoning questions in LLaVA's instruction data."""
    scene = td.random_scene(rng)
    if compare and rng.random() < compare:  # no draw at 0: earlier families' streams are unchanged
        item = td.perception_item(scene, "compare", td.random_claim(rng, scene.count))
    elif rng.random() < VERIFY:
        item = td.perception_item(scene, "verify", td.random_claim(rng, scene.count))
    else:
        item = td.perception_item(scene, rng.choice(KINDS[:-1]))
    return td.render(scene), td.chat_prompt(item.question, image=True), f"{item.answer} </s>"
