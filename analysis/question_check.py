"""Which words of a question the model cannot read, and a close rewording it can (chat and `analysis ask`).

A real tokenizer splits any word into known pieces, so the check means something only where the
tokenizer maps a word to its unknown token: then the model sees `<unk>` there and answers with
confidence about a question it never read. That is every word outside the bundled toy family's
closed vocabulary (95 words, numbers 0-20). For a closed word-level vocabulary that holds the toy
family's template words, the check also says what the model understands (its question templates,
its vocabulary, its kind of picture) and offers a rewording: each unknown word replaced by
**[choice]** its entry in SYNONYMS, else the known words nearest by edit distance (at most 1 edit under 6 letters, 2 otherwise,
and fewer than half the word's letters), then the closest of the family's question templates
(difflib's ratio over words), filled with the question's own shape and numbers.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import numpy as np

from tasks import toydata as td

WORD_RE = re.compile(r"\w+|[^\w\s]+")  # the toy tokenizer's pre-tokenizer (tokenizers' Whitespace)
# Words students use for what the toy vocabulary says otherwise; each value is known to the toy family.
SYNONYMS = {
    "colour": "color", "colours": "color", "colors": "color", "count": "how many", "number": "how many",
    "total": "how many", "dots": "circles", "dot": "circle", "rings": "circles", "rectangles": "squares",
    "rectangle": "square", "cubes": "squares", "pyramids": "triangles", "objects": "shapes", "things": "shapes",
    "items": "shapes", "kind": "shape", "type": "shape", "picture": "image", "photo": "image", "which": "what",
    "plus": "more", "add": "added", "adds": "added", "remove": "taken away", "removed": "taken away",
    "minus": "taken away", "subtract": "taken away", "take": "taken", "left over": "left", "remain": "left",
    "remaining": "left", "shown": "there", "visible": "there", "can": "are", "you": "there", "do": "are",
}
PICTURES = ("1-9 shapes of one kind (circle, square, triangle) and one colour (red, green, blue, yellow) in a "
            "3x3 grid on a plain light background, 48x48 pixels")


@dataclass
class QuestionCheck:
    """What the check found; `lines()` is what the chat and the CLI show (empty: say nothing)."""

    unknown: list[str] = field(default_factory=list)
    suggestions: dict[str, list[str]] = field(default_factory=dict)
    unk_token: str = "<unk>"
    rewording: str | None = None  # the closest template, filled in (toy family only)
    understands: list[str] = field(default_factory=list)  # what it reads (toy family only)
    picture: str | None = None  # the picture is not like the family's (toy family only)

    def lines(self) -> list[str]:
        out = []
        if self.unknown:
            words = ", ".join(f"'{w}'" for w in self.unknown)
            it = "it" if len(self.unknown) == 1 else "them"
            out.append(f"the model does not know {words}: its tokenizer reads {it} as {self.unk_token}, "
                       "so the answer is a guess")
        near = [f"'{w}' -> {' / '.join(repr(s) for s in self.suggestions[w])}" for w in self.unknown
                if self.suggestions.get(w)]
        if near:
            out.append("closest known words: " + ", ".join(near))
        if self.rewording:
            out.append(f"try: \"{self.rewording}\" (the closest question it was trained on)")
        if self.picture:
            out.append(self.picture)
        return out + self.understands if out else []

    def to_json(self) -> dict:
        return {"unknown": self.unknown, "suggestions": self.suggestions, "rewording": self.rewording,
                "picture": self.picture, "lines": self.lines()}


def _is_unknown(tok, word: str) -> bool:
    ids = tok(word, add_special_tokens=False)["input_ids"]
    return tok.unk_token_id in ids


def known_words(tok) -> list[str] | None:
    """The closed vocabulary's words (no special tokens, no punctuation); None for an open tokenizer."""
    model = getattr(getattr(tok, "backend_tokenizer", None), "model", None)
    if type(model).__name__ != "WordLevel":
        return None
    special = set(tok.all_special_tokens)
    return sorted(w for w in tok.get_vocab() if w not in special and re.fullmatch(r"\w+", w))


def is_toy_vocabulary(words: list[str] | None) -> bool:
    """A closed vocabulary holding the toy family's template words (the bundled family or a rebuild)."""
    need = {"how", "many", "are", "there", "answer", *td.PLURAL.values(), *td.COLOURS}
    return words is not None and need <= set(words)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute: one edit each)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest(word: str, words: list[str]) -> list[str]:
    """SYNONYMS' entry, else the known words within the edit budget, nearest first (at most 3)."""
    w = word.lower()
    if w in SYNONYMS:
        return [SYNONYMS[w]]
    if w.isdigit():
        return []
    scored = sorted((edit_distance(w, k), k) for k in words if not k.isdigit())
    budget = 1 if len(w) < 6 else 2  # two edits make most short words another word ('tally' -> 'balls')
    best = [(d, k) for d, k in scored if d <= budget and 2 * d < len(w)]
    return [k for _, k in best[:3]]


def _slots(words: list[str]) -> tuple[str, list[int], str]:
    """(shape, numbers, object) the question names, with defaults for the template's blanks."""
    singular = {p: s for s, p in td.PLURAL.items()}
    shape = next((singular.get(w, w) for w in words if w in td.SHAPES or w in singular), "circle")
    numbers = [int(w) for w in words if w.isdigit() and int(w) <= td.MAX_NUMBER] + [3, 4]
    noun = next((w for w in words if w in td.OBJECTS or w in singular), "apples")
    return shape, numbers, noun


def templates(words: list[str], has_image: bool) -> list[str]:
    """The family's question forms (tasks.toydata's own generators), filled with the question's
    shape, numbers and objects: the perception and visual-math ones with an image, else the word problems."""
    shape, (a, b, *_), noun = _slots(words)
    if not has_image:
        ops = [("+", b), ("-", min(b, max(a - 1, 1)))]
        return [td.text_math_item(t, a, op, k, noun, td.NAMES[0]).question
                for t in range(td.TEXT_MATH_TEMPLATES) for op, k in ops]
    scene = td.Scene(shape, "red", max(1, min(a, 9)), 0)
    out = [td.perception_item(scene, kind, claim=a).question
           for kind in ("count", "count_shapes", "colour", "shape", "verify", "compare", "describe")]
    return out + [td.visual_math_item(scene, op, k).question for op, k in (("+", a), ("-", a))]


def closest_template(words: list[str], has_image: bool) -> str:
    forms = templates(words, has_image)
    return max(forms, key=lambda f: difflib.SequenceMatcher(None, words, f.split()).ratio())


def vocabulary_line(words: list[str]) -> str:
    """The closed vocabulary in groups: numbers, colours, shapes, objects, names, the rest."""
    groups = {"colours": set(td.COLOURS), "shapes": set(td.SHAPES) | set(td.PLURAL.values()),
              "objects": set(td.OBJECTS), "names": set(td.NAMES)}
    rest = [w for w in words if not w.isdigit() and not any(w in g for g in groups.values())]
    shown = "; ".join(f"{k}: {' '.join(sorted(g & set(words)))}" for k, g in groups.items())
    return f"its {len(words)} words: numbers 0-{td.MAX_NUMBER}; {shown}; and: {' '.join(rest)}"


def check_question(tok, question: str, image=None) -> QuestionCheck:
    """The words of `question` this tokenizer maps to its unknown token, and for the toy family what
    to ask instead and whether the picture (a PIL image or None) is like its scenes. Nothing for a
    tokenizer without an unknown token."""
    if tok.unk_token_id is None:
        return QuestionCheck()
    words = WORD_RE.findall(question)
    unknown = list(dict.fromkeys(w for w in words if _is_unknown(tok, w)))
    check = QuestionCheck(unknown, unk_token=str(tok.unk_token))
    vocab = known_words(tok)
    if not is_toy_vocabulary(vocab):
        return check
    check.picture = picture_check(image) if image is not None else None
    if not unknown and not check.picture:
        return check
    check.suggestions = {w: nearest(w, vocab) for w in unknown}
    fixed = []
    for w in words:
        sub = check.suggestions.get(w)
        fixed += (sub[0].split() if sub else []) if w in check.suggestions else [w.lower()]
    check.rewording = closest_template(fixed, image is not None) if unknown else None
    check.understands = [vocabulary_line(vocab), f"the pictures it knows: {PICTURES}"]
    return check


def picture_check(image) -> str | None:
    """A line when a picture does not look like the toy scenes, else None. **[choice]** At 48x48 a pixel
    matches a palette colour when each channel is within 40 of it; a toy scene has at least 90% of its
    pixels on a background colour or a shape colour, and at least 80% of the others on a shape colour
    (every bundled sample: 100% and 100%)."""
    pixels = np.asarray(image.convert("RGB").resize((td.IMAGE_SIZE, td.IMAGE_SIZE)), dtype=float).reshape(-1, 1, 3)

    def near(colours) -> np.ndarray:
        return (np.abs(pixels - np.array(colours, dtype=float)[None]).max(-1) <= 40).any(-1)

    background, shape = near(td.BACKGROUNDS), near(list(td.COLOURS.values()))
    foreground = ~background
    if (background | shape).mean() >= 0.9 and foreground.any() and shape[foreground].mean() >= 0.8:
        return None
    return "this picture does not look like the ones the model was trained on: expect a guess"
