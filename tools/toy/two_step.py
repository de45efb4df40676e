"""Accuracy of LLM folders on two-step word problems (two groups summed, then the change), the skill
the math fine-tune adds when `math_two_step` is on (for assets/toy/README.md).

    python -m tools.toy.two_step runs/fam/base runs/fam/math [--items 60]
"""

from __future__ import annotations

import argparse
import random
import sys

from analysis.evaluate import load_model, score
from tasks import toydata as td


def accuracy(folder: str, items: list[td.Item]) -> tuple[float, str]:
    """(share answered right by the eval suites' greedy generation, the first item's generation)."""
    model, tok = load_model(folder)
    recs = score(model, tok, [{"id": str(i), "question": it.question, "answer": it.final}
                              for i, it in enumerate(items)])
    return sum(r["correct"] for r in recs) / len(recs), recs[0]["output"]


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
