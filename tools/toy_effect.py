"""Measure the toy family's merge effect with a small in-memory merge (no merge engine needed).

    python tools/toy_effect.py [--family assets/toy] [--limit N] [--alphas 0.1,0.2,...] [--threads 1]

Loads vlm/, math/ and base/ with transformers, merges the math model into the VLM's language
model for every alpha with `task_arithmetic` (W = W_v + alpha * (W_r - W_0)) and `linear`
(W = (1 - alpha) * W_v + alpha * W_r) over the decoder layers and the final norm (embeddings
and lm_head stay the VLM's), evaluates every suite, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from analysis.evaluate import SUITES, evaluate, load_model  # noqa: E402

METHODS = ("task_arithmetic", "linear")


def merged_lm_state(vlm_lm: dict, math_lm: dict, base_lm: dict, method: str, alpha: float) -> dict:
    """The merged decoder-layer and final-norm tensors (canonical names, e.g. layers.0.mlp...)."""
    out = {}
    for name, wv in vlm_lm.items():
        if not (name.startswith("layers.") or name == "norm.weight"):
            continue
        if method == "task_arithmetic":
            out[name] = wv + alpha * (math_lm[name] - base_lm[name])
        else:
            out[name] = (1 - alpha) * wv + alpha * math_lm[name]
    return out


def _row(name: str, acc: dict) -> str:
    cells = [f"{100 * acc[s]:.1f}" if s in acc else "-" for s in SUITES]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=str(ROOT / "assets" / "toy"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fam = Path(args.family)
    eval_dir = fam / "eval"
    t0 = time.time()

    vlm, proc = load_model(fam / "vlm")
    math, math_tok = load_model(fam / "math")
    base, _ = load_model(fam / "base")
    vlm_lm = {k: v.clone() for k, v in vlm.model.language_model.state_dict().items()}
    math_lm, base_lm = math.model.state_dict(), base.model.state_dict()

    rows = ["| model | " + " | ".join(SUITES) + " |", "|---" * (len(SUITES) + 1) + "|"]

    def run(name, model, p):
        acc = evaluate((model, p), limit=args.limit, eval_dir=eval_dir)
        rows.append(_row(name, acc))
        print(rows[-1], file=sys.stderr, flush=True)

    run("vlm", vlm, proc)
    run("math", math, math_tok)
    run("base", base, math_tok)
    for method in args.methods.split(","):
        for alpha in (float(a) for a in args.alphas.split(",")):
            merged = merged_lm_state(vlm_lm, math_lm, base_lm, method, alpha)
            vlm.model.language_model.load_state_dict(merged, strict=False)
            run(f"{method} alpha={alpha:g}", vlm, proc)
    vlm.model.language_model.load_state_dict(vlm_lm)
    print("\n".join(rows))
    print(f"\n({time.time() - t0:.0f}s, limit={args.limit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
