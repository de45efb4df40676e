"""Accuracy of LLM folders on two-step word problems (two groups summed, then the change), the skill
the math fine-tune adds when `math_two_step` is on (for assets/toy/README.md).

    python -m tools.toy.two_step runs/fam/base runs/fam/math [--items 60]
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks import toydata as td


def accuracy(folder: str, items: list[td.Item]) -> tuple[float, str]:
    """(share answered right by greedy generation, the first item's generation)."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    right, first = 0, None
    for it in items:
        ids = tok(td.chat_prompt(it.question, image=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        right += td.parse_answer(text) == it.final
        first = first if first is not None else text
    return right / len(items), first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--items", type=int, default=60)
    args = ap.parse_args(argv)
    rng = random.Random(123)  # its own seed: not the training stream's
    items = [td.random_two_step_math(rng) for _ in range(args.items)]
    print(f"e.g. {items[0].question}")
    for folder in args.folders:
        acc, first = accuracy(folder, items)
        print(f"{folder}: {100 * acc:.1f}% of {len(items)} ({first})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
