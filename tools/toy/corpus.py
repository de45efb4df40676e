"""Text training data: the base model's pretraining mixture and the math fine-tune's problems.

The base sees every kind of text the later stages build on, but never a solved word problem:
- sentences about shapes, colours and counts, and about objects that are added or taken away;
- arithmetic facts ("3 + 4 = 7 .") and counting;
- short question/answer chats in the shared answer format, where the facts are in the question
  ("there are 3 red circles . how many circles are there ?") or are a plain sum ("what is 3 + 4 ?").
The math fine-tune then teaches word problems with a short chain of thought.
"""

from __future__ import annotations

import random

from tasks import toydata as td


def _shape_sentence(rng: random.Random) -> str:
    scene = td.random_scene(rng)
    noun = td.PLURAL[scene.shape]
    return rng.choice(
        [
            f"there are {scene.count} {scene.colour} {noun} .",
            f"the {noun} are {scene.colour} .",
            f"a {scene.shape} is a shape .",
            f"{scene.colour} is a color .",
            f"i see {scene.count} {noun} .",
        ]
    )


def _object_sentence(rng: random.Random) -> str:
    noun = rng.choice(td.OBJECTS + tuple(td.PLURAL.values()))
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice(
        [
            f"there are {a} {noun} .",
            f"{rng.choice(td.NAMES)} has {a} {noun} .",
            f"{b} more {noun} are added .",
            f"{b} {noun} are taken away .",
            f"a box has {a} {noun} .",
        ]
    )


def _fact(rng: random.Random) -> str:
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b} ."
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b} ."


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 12)
    return " ".join(str(i) for i in range(start, start + rng.randint(3, 8))) + " ."


def chat_pair(rng: random.Random, compare: float = 0.0) -> tuple[str, str]:
    """(prompt, answer) of a text-only chat in the shared answer format; a share `compare` of the
    questions about a stated scene are comparisons ("are there more than 5 circles ?")."""
    r = rng.random()
    if r < 0.5:
        scene = td.random_scene(rng)
        if compare and rng.random() < compare:  # no draw at 0: earlier families' streams are unchanged
            kind = "compare"
        else:
            kind = rng.choice((*td.PERCEPTION_KINDS, "verify"))
        item = td.perception_item(scene, kind, td.random_claim(rng, scene.count))
        question = f"there are {scene.count} {scene.colour} {td.PLURAL[scene.shape]} . {item.question}"
        return td.chat_prompt(question, image=False), f"{item.answer} </s>"
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    if rng.random() < 0.5:
        op, c = "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        op, c = "-", a - b
    return td.chat_prompt(
        f"what is {a} {op} {b} ?", image=False
    ), f"{a} {op} {b} = {c} . the answer is {c} . </s>"


def _chat(rng: random.Random, compare: float = 0.0) -> str:
    return " ".join(chat_pair(rng, compare))


def base_text(rng: random.Random, word_problems: float = 0.0, compare: float = 0.0) -> str:
    """One pretraining sequence: a chat, or a short document of mixed sentences; with probability
    `word_problems`, a solved word problem (pretraining corpora hold some math, so the later math
    fine-tune sharpens a skill the base half has instead of writing it from nothing)."""
    if word_problems and rng.random() < word_problems:  # no draw at 0: the 4-layer stream is unchanged
        return " ".join(_word_problem(rng))
    if rng.random() < 0.35:
        return _chat(rng, compare)
    makers = (_shape_sentence, _object_sentence, _fact, _fact, _counting)
    return "<s> " + " ".join(rng.choice(makers)(rng) for _ in range(rng.randint(2, 5))) + " </s>"


REPLAY = 0.3  # share of the math fine-tune that replays the base's chats, so the task vector stays on math


def math_example(rng: random.Random, replay: float = REPLAY, two_step: float = 0.0,
                 compare: float = 0.0) -> tuple[str, str]:
    """(prompt, answer) of a training word problem (held-out combinations are never drawn),
    or, with probability `replay`, one of the base's text chats; a share `two_step` of the word
    problems sums two groups before the arithmetic (td.two_step_math_item)."""
    if rng.random() < replay:
        return chat_pair(rng, compare)
    if two_step and rng.random() < two_step:  # no draw at 0: earlier families' streams are unchanged
        item = td.random_two_step_math(rng)
        return td.chat_prompt(item.question, image=False), f"{item.answer} </s>"
    return _word_problem(rng)


def _word_problem(rng: random.Random) -> tuple[str, str]:
    while True:
        key, item = td.random_text_math(rng)
        if not td.is_heldout(key):
            return td.chat_prompt(item.question, image=False), f"{item.answer} </s>"
