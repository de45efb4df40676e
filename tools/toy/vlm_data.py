"""Image + question training examples for the VLM stage: perception only, no arithmetic."""

from __future__ import annotations

import random

from tasks import toydata as td

KINDS = (*td.PERCEPTION_KINDS, "describe", "verify")
VERIFY = 0.3  # share of verify questions, whose number is often not the count (a distractor)


def vlm_example(rng: random.Random):
    """(PIL image, prompt, answer). Scenes come from the training rng; eval uses its own seeds."""
    scene = td.random_scene(rng)
    if rng.random() < VERIFY:
        item = td.perception_item(scene, "verify", td.random_claim(rng, scene.count))
    else:
        item = td.perception_item(scene, rng.choice(KINDS[:-1]))
    return td.render(scene), td.chat_prompt(item.question, image=True), f"{item.answer} </s>"
