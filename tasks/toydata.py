"""Images and questions of the toy family, shared by training (tools/toy) and the eval suites.

A scene is a few shapes of one kind and one colour on a plain background, laid out in a 3x3
grid of cells (one shape per cell, jittered), so that the count is 1-9. Every question is
answered in one format, "... The answer is X.", which the eval suites parse.

- perception:  image + "how many circles are there ?" -> "there are 3 circles . the answer is 3 ."
- visual_math: image + "4 more circles are added . how many circles now ?"
               -> "there are 3 circles . 3 + 4 = 7 . the answer is 7 ."
- text_math:   "there are 3 apples . 4 more apples are added . how many apples now ?"
               -> "there are 3 apples . 3 + 4 = 7 . the answer is 7 ."

Everything is lower case with spaces around punctuation, so that a word-level tokenizer over a
closed vocabulary covers it. `is_heldout` splits question/number combinations between training
and evaluation so that eval items never appear in any training set.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID
MAX_NUMBER = 20

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
BACKGROUNDS = [(255, 255, 255), (235, 235, 235), (250, 245, 230)]
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
OBJECTS = ("apples", "books", "cats", "birds", "cars", "cups", "pens", "stars", "boxes", "balls")
NAMES = ("tom", "anna", "sam", "lily", "ben", "mia")

IMAGE_TOKEN = "<image>"
ANSWER_RE = re.compile(r"the answer is\s+([a-z0-9]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    seed: int  # placement / size / background seed


@dataclass(frozen=True)
class Item:
    question: str
    answer: str  # the full target text, ending in "the answer is X ."
    final: str  # X
    scene: Scene | None = None


def is_heldout(key: str, fraction: float = 0.25) -> bool:
    """Deterministic split of combinations: True -> eval only, False -> training only."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return (h % 1000) < fraction * 1000


def parse_answer(text: str) -> str | None:
    """The X of the first "the answer is X" in a generation, lower case, or None."""
    m = ANSWER_RE.search(text)
    return m.group(1).lower() if m else None


# ----------------------------------------------------------------------------------------- images
def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(1, 9), rng.randrange(2**31))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene: `count` shapes in distinct random grid cells, jittered, random sizes."""
    rng = random.Random(scene.seed)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    for cell in rng.sample(range(GRID * GRID), scene.count):
        r = rng.randint(4, 6)
        cx = (cell % GRID) * CELL + CELL // 2 + rng.randint(-(CELL // 2 - r - 1), CELL // 2 - r - 1)
        cy = (cell // GRID) * CELL + CELL // 2 + rng.randint(-(CELL // 2 - r - 1), CELL // 2 - r - 1)
        box = (cx - r, cy - r, cx + r, cy + r)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img if size == IMAGE_SIZE else img.resize((size, size), Image.NEAREST)


# -------------------------------------------------------------------------------------- questions
def perception_item(scene: Scene, kind: str, claim: int | None = None) -> Item:
    """kind: count | count_shapes | colour | shape | describe (no final answer) | verify | compare.

    verify asks "are there {claim} circles ?": the question carries a number that may not be
    the count, so a model learns to take the count from the image, not from the question text.
    """
    noun = PLURAL[scene.shape]
    n = scene.count
    if kind == "verify":
        claim = n if claim is None else claim
        yes = "yes" if claim == n else "no"
        return Item(f"are there {claim} {noun} ?", f"there are {n} {noun} . the answer is {yes} .", yes, scene)
    if kind == "compare":  # a visual question with one reasoning step that is not arithmetic
        k = n if claim is None else claim
        rel, yes = (">", "yes") if n > k else ("<", "no") if n < k else ("=", "no")
        return Item(f"are there more than {k} {noun} ?",
                    f"there are {n} {noun} . {n} {rel} {k} . the answer is {yes} .", yes, scene)
    if kind == "count":
        return Item(
            f"how many {noun} are there ?", f"there are {n} {noun} . the answer is {n} .", str(n), scene
        )
    if kind == "count_shapes":
        return Item(
            "how many shapes are there ?", f"there are {n} {noun} . the answer is {n} .", str(n), scene
        )
    if kind == "colour":
        c = scene.colour
        return Item(f"what color are the {noun} ?", f"the {noun} are {c} . the answer is {c} .", c, scene)
    if kind == "shape":
        return Item("what shape are they ?", f"they are {noun} . the answer is {noun} .", noun, scene)
    if kind == "describe":
        return Item("describe the image .", f"there are {n} {scene.colour} {noun} .", "", scene)
    raise ValueError(kind)


PERCEPTION_KINDS = ("count", "count_shapes", "colour", "shape")  # the eval suite's kinds


def random_claim(rng: random.Random, count: int) -> int:
    """The number a verify question asks about: the true count half the time, else another."""
    if rng.random() < 0.5:
        return count
    return rng.choice([k for k in range(1, 10) if k != count])


def _op_sentences(noun: str, op: str, b: int) -> tuple[str, str]:
    """The change sentence and the question for adding or taking away b things."""
    if op == "+":
        return f"{b} more {noun} are added .", f"how many {noun} now ?"
    return f"{b} {noun} are taken away .", f"how many {noun} are left ?"


def _solution(a: int, op: str, b: int) -> tuple[str, int]:
    c = a + b if op == "+" else a - b
    return f"{a} {op} {b} = {c} .", c


def random_op(rng: random.Random, a: int) -> tuple[str, int]:
    """An operation on a count a: add 1-9, or take away 1..a-1 (when a > 1)."""
    if a > 1 and rng.random() < 0.4:
        return "-", rng.randint(1, a - 1)
    return "+", rng.randint(1, 9)


def visual_math_item(scene: Scene, op: str, b: int) -> Item:
    noun = PLURAL[scene.shape]
    change, ask = _op_sentences(noun, op, b)
    sol, c = _solution(scene.count, op, b)
    return Item(
        f"{change} {ask}", f"there are {scene.count} {noun} . {sol} the answer is {c} .", str(c), scene
    )


def text_math_item(template: int, a: int, op: str, b: int, noun: str, name: str) -> Item:
    """A word problem with no image. Templates 0-1 share the visual_math phrasing; 3-4 put the
    change before the starting amount; 2 is about a person."""
    sol, c = _solution(a, op, b)
    if template != 2:
        change, ask = _op_sentences(noun, op, b)
        start = f"there are {a} {noun} ." if template in (0, 3) else f"a box has {a} {noun} ."
        # 3-4: the change comes first, so the starting amount is not the first number in the question
        question = f"{start} {change} {ask}" if template < 2 else f"{change} {start} {ask}"
        return Item(question, f"there are {a} {noun} . {sol} the answer is {c} .", str(c))
    verb = "gets" if op == "+" else "gives away"
    ask = f"how many {noun} does {name} have now ?"
    return Item(
        f"{name} has {a} {noun} and {verb} {b} . {ask}",
        f"{name} has {a} {noun} . {sol} the answer is {c} .",
        str(c),
    )


TEXT_MATH_TEMPLATES = 5


def two_step_math_item(a1: int, a2: int, colours: tuple[str, str], op: str, b: int, noun: str) -> Item:
    """A word problem whose starting amount is not written in the question: two groups are
    summed first ("there are 2 red cups and 3 blue cups ." -> "there are 5 cups ."), so the
    arithmetic has to take its first number from the model's own first sentence."""
    a = a1 + a2
    change, ask = _op_sentences(noun, op, b)
    sol, c = _solution(a, op, b)
    return Item(
        f"there are {a1} {colours[0]} {noun} and {a2} {colours[1]} {noun} . {change} {ask}",
        f"there are {a} {noun} . {sol} the answer is {c} .",
        str(c),
    )


def random_two_step_math(rng: random.Random) -> Item:
    a = rng.randint(2, 9)  # the scenes' count range, so the summed statement looks like a perceived one
    a1 = rng.randint(1, a - 1)
    op, b = random_op(rng, a)
    colours = tuple(rng.sample(list(COLOURS), 2))
    return two_step_math_item(a1, a - a1, colours, op, b, rng.choice(OBJECTS + tuple(PLURAL.values())))


def random_text_math(rng: random.Random) -> tuple[str, Item]:
    """(holdout key, item). Nouns include the shapes so text and image problems share words."""
    a = rng.randint(1, 9)
    op, b = random_op(rng, a)
    noun = rng.choice(OBJECTS + tuple(PLURAL.values()))
    t = rng.randrange(TEXT_MATH_TEMPLATES)
    item = text_math_item(t, a, op, b, noun, rng.choice(NAMES))
    return f"text:{t}:{noun}:{a}{op}{b}", item


def random_visual_math(rng: random.Random) -> tuple[str, Item]:
    scene = random_scene(rng)
    op, b = random_op(rng, scene.count)
    return f"visual:{scene.shape}:{scene.count}{op}{b}", visual_math_item(scene, op, b)


# -------------------------------------------------------------------------------------- chat text
def chat_prompt(question: str, image: bool, bos: str = "<s>") -> str:
    """The exact text the bundled chat template renders for one user turn + generation prompt."""
    img = f" {IMAGE_TOKEN}" if image else ""
    return f"{bos} user :{img} {question} assistant :"


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %} user :"
    "{% if m['content'] is string %} {{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% else %} assistant :"
    "{% if m['content'] is string %} {{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)
