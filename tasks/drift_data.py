"""Training examples for the short fine-tunes (DRIFT and plain): image + chain-of-thought
visual math items generated like the toy eval data, from combinations the eval never uses."""

from __future__ import annotations

import random

from tasks import toydata as td


def training_examples(n: int, seed: int = 0, replay: float = 0.0) -> list:
    """n (PIL image, question, answer) triples, none of them held out for evaluation. replay: the
    share that are perception questions (the four kinds of the perception suite, on scenes drawn
    from their own stream; a scene is 2**31 seeds wide, so one equal to an eval scene is
    vanishingly rare), spread evenly through the list; the visual-math ones are the same whatever
    the share, so runs with and without replay differ only by the replayed items."""
    rng = random.Random(10_000 + seed)
    replay_rng = random.Random(20_000 + seed)
    n_replay = round(n * replay)
    math = []
    while len(math) < n - n_replay:
        key, item = td.random_visual_math(rng)
        if td.is_heldout(key):
            continue
        math.append((td.render(item.scene), item.question, item.answer))
    out, k = [], 0
    for i in range(n):
        if k < n_replay and (k + 1) * n <= (i + 1) * n_replay + n // 2:  # the replayed ones, spread evenly
            scene = td.random_scene(replay_rng)
            item = td.perception_item(scene, replay_rng.choice(td.PERCEPTION_KINDS))
            out.append((td.render(scene), item.question, item.answer))
            k += 1
        else:
            out.append(math[i - k])
    return out
