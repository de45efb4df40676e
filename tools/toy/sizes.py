"""||tau|| / ||W_0|| per projection matrix for both fine-tunes of a family (for assets/toy/README.md).

    python -m tools.toy.sizes [--family assets/toy]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from analysis.spectra import matrices, open_triple

ROOT = Path(__file__).resolve().parents[2]


def sizes(family: Path) -> dict[str, dict[int, list[float]]]:
    """{"vlm"|"math": {layer: [||tau|| / ||W_0|| of each projection matrix]}}."""
    out: dict[str, dict[int, list[float]]] = {"vlm": {}, "math": {}}
    with open_triple(family / "vlm", family / "math", family / "base") as t:
        for layer, _module, c in matrices(t):
            w0 = t.get("base", c)
            tau_v, tau_r = t.task_vectors(c)
            out["vlm"].setdefault(layer, []).append(float(tau_v.norm() / w0.norm()))
            out["math"].setdefault(layer, []).append(float(tau_r.norm() / w0.norm()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=str(ROOT / "assets" / "toy"))
    args = ap.parse_args(argv)
    rows = sizes(Path(args.family))
    print("| layer | VLM: min / median / max | math: min / median / max |\n|---|---|---|")
    for layer in sorted(rows["vlm"]):
        cells = [" / ".join(f"{f(rows[m][layer]):.3f}" for f in (min, statistics.median, max)) for m in ("vlm", "math")]
        print(f"| {layer} | {cells[0]} | {cells[1]} |")
    for m in ("vlm", "math"):
        flat = [x for v in rows[m].values() for x in v]
        print(f"{m}: all matrices {min(flat):.3f} - {max(flat):.3f}, median {statistics.median(flat):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
