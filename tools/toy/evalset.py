"""Held-out eval suites (assets/toy/eval) and the app's sample images (assets/toy/samples).

Eval scenes are drawn from their own seed, disjoint from the training streams; text problems
are drawn only from the held-out combinations (`toydata.is_heldout`) that training never sees.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tasks import toydata as td
from tools.toy.save import save_atomic

EVAL_SEED = 10_000
SAMPLE_SEED = 20_000


def _record(idx: str, item: td.Item, image: str | None) -> dict:
    return {"id": idx, "question": item.question, "answer": item.final, "target": item.answer, "image": image}


def _unique(draw, n: int) -> list:
    """n draws with distinct questions/scenes (draw() -> (key, item))."""
    seen, out = set(), []
    while len(out) < n:
        key, item = draw()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def build_suites(n: int, seed: int = EVAL_SEED) -> dict[str, list[td.Item]]:
    rng = random.Random(seed)

    def perception():
        scene = td.random_scene(rng)
        return scene.seed, td.perception_item(scene, rng.choice(td.PERCEPTION_KINDS))

    def visual_math():
        key, item = td.random_visual_math(rng)
        return item.scene.seed, item

    def text_math():
        key, item = td.random_text_math(rng)
        return (key if td.is_heldout(key) else None), item

    def heldout_text():
        while True:
            key, item = text_math()
            if key is not None:
                return key, item

    return {
        "perception": _unique(perception, n),
        "visual_math": _unique(visual_math, n),
        "text_math": _unique(heldout_text, n),
    }


def write_eval(out_dir: Path, n: int) -> Path:
    suites = build_suites(n)

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        for name, items in suites.items():
            with (tmp / f"{name}.jsonl").open("w") as f:
                for i, item in enumerate(items):
                    image = None
                    if item.scene is not None:
                        image = f"images/{name}_{i:04d}.png"
                        td.render(item.scene).save(tmp / image, optimize=True)
                    f.write(json.dumps(_record(f"{name}-{i:04d}", item, image)) + "\n")

    return save_atomic(out_dir, write)


def write_samples(out_dir: Path, n: int = 6) -> Path:
    """n sample images with one perception and one visual-math question each (samples.json)."""
    rng = random.Random(SAMPLE_SEED)

    def write(tmp: Path) -> None:
        samples = []
        for i in range(n):
            scene = td.random_scene(rng)
            name = f"sample_{i}.png"
            td.render(scene).save(tmp / name, optimize=True)
            kind = td.PERCEPTION_KINDS[i % len(td.PERCEPTION_KINDS)]
            op, b = td.random_op(rng, scene.count)
            for item, suite in (
                (td.perception_item(scene, kind), "perception"),
                (td.visual_math_item(scene, op, b), "visual_math"),
            ):
                samples.append(
                    {
                        "image": name,
                        "question": item.question,
                        "answer": item.final,
                        "target": item.answer,
                        "suite": suite,
                    }
                )
        (tmp / "samples.json").write_text(json.dumps(samples, indent=1) + "\n")

    return save_atomic(out_dir, write)
