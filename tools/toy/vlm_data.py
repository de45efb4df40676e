"""Image + question training examples for the VLM stage: perception only, no arithmetic."""

from __future__ import annotations

import random

from analysis import toydata as td

KINDS = (*td.PERCEPTION_KINDS, "describe")


def vlm_example(rng: random.Random):
    """(PIL image, prompt, answer). Scenes come from the training rng; eval uses its own seeds."""
    scene = td.random_scene(rng)
    item = td.perception_item(scene, rng.choice(KINDS))
    return td.render(scene), td.chat_prompt(item.question, image=True), f"{item.answer} </s>"
