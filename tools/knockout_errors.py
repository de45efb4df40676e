"""What a knockout changes in the bundled family's visual-math answers: each answer counted as right, a
miscount of the image, a wrong number or operation taken from the question, or no arithmetic at all.

    python -m tools.knockout_errors [--layer 4] [--group attention] [--limit 100] [--alpha 1.0]

The task_arithmetic merge (alpha) is made in place, scored intact, then with one layer's group knocked
out (analysis.knockout: its weights set to 1/out); the answers whose outcome flips are listed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from analysis import knockout
from analysis.evaluate import evaluate, load_model, load_suite
from merging.inplace import InPlaceMerger
from merging.recipe import from_dict

TOY = Path(__file__).resolve().parent.parent / "assets" / "toy"
STEP = re.compile(r"there are (\d+) \w+ \. \d+ [-+] \d+ =")


def kinds(items: list[dict], recs: list[dict]) -> dict:
    """right / miscount (the stated count is not the target's) / wrong operand or operation / no arithmetic."""
    out = {"right": 0, "miscount": 0, "wrong operand or operation": 0, "no arithmetic": 0}
    for it, r in zip(items, recs):
        step, truth = STEP.search(r["output"]), re.search(r"there are (\d+)", it.get("target", ""))
        if r["correct"]:
            out["right"] += 1
        elif step is None:
            out["no arithmetic"] += 1
        elif truth and truth.group(1) != step.group(1):
            out["miscount"] += 1
        else:
            out["wrong operand or operation"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--group", choices=tuple(knockout.GROUPS), default="attention")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, proc = load_model(TOY / "vlm")
    refs = {"vlm": str(TOY / "vlm"), "reasoner": str(TOY / "math"), "base": str(TOY / "base")}
    InPlaceMerger(model, refs["vlm"], refs["reasoner"], refs["base"]).apply(
        from_dict({**refs, "method": "task_arithmetic", "parameters": {"alpha": args.alpha}}))
    items = load_suite("visual_math", args.limit)

    def score():
        return evaluate((model, proc), suites=["visual_math"], limit=args.limit, return_items=True)["items"]["visual_math"]

    intact = score()
    with knockout.knocked_out(model, args.layer, args.group):
        knocked = score()
    print(f"merge (task_arithmetic alpha {args.alpha:g}), {args.limit} visual_math items")
    print("  intact:", kinds(items, intact))
    print(f"  layer {args.layer} {args.group} knocked out:", kinds(items, knocked))
    for it, a, b in zip(items, intact, knocked):
        if a["correct"] != b["correct"]:
            print(f"  {it['question']} | intact: {a['output'].strip()} | knocked out: {b['output'].strip()}")


if __name__ == "__main__":
    main()
