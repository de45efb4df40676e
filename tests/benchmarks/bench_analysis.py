"""Cold and cached time of the spectra and similarity analyses, the way the app runs them.

Both go through analysis.runner.run with the knobs' defaults (spectra k, similarity rank), one
after the other, first with a fresh temporary cache folder (analysis cache and decomposition
cache both empty), then again on the same folder (served from the cache). Prints one JSON line.

  python tests/benchmarks/make_synthetic.py make /tmp/syn --preset qwen2-0.5b
  python tests/benchmarks/bench_analysis.py --root /tmp/syn [--device cpu] [--before HEAD]

--before REF also times the code at git ref REF (exported with git archive, run in a child
process on the same triple), so both figures come from one run under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def measure(root: Path, device: str) -> dict:
    import torch

    from analysis import runner

    torch.set_grad_enabled(False)
    triple = (str(root / "vlm"), str(root / "reasoner"), str(root / "base"))
    out: dict = {"device": device, "threads": torch.get_num_threads(), "load_start": load()}
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as cache:
        job = runner.Job(triple=triple, recipe=None, source=None, device=device, cache_dir=cache)
        results = {}
        for phase in ("cold", "cached"):
            for name in ("spectra", "similarity"):
                t0 = time.perf_counter()
                results[phase, name], params = runner.run(name, job, {})
                out[f"{name}_{phase}_s"] = round(time.perf_counter() - t0, 3)
                out[f"{name}_params"] = params
        out["cold_s"] = round(out["spectra_cold_s"] + out["similarity_cold_s"], 3)
        out["cached_s"] = round(out["spectra_cached_s"] + out["similarity_cached_s"], 3)
        out["cached_equal"] = all(results["cold", n] == results["cached", n] for n in ("spectra", "similarity"))
    out["load_end"] = load()
    sp, si = results["cold", "spectra"], results["cold", "similarity"]
    # A fingerprint of the figures' numbers, to compare code versions on the same triple.
    out["checks"] = {"ratio_mean": sum(e["ratio"] for e in sp["entries"]) / len(sp["entries"]),
                     "s_v_top_mean": sum(e["s_v"][0] for e in sp["entries"]) / len(sp["entries"]),
                     "subspace_mean": sum(e["subspace"] for e in si["entries"]) / len(si["entries"]),
                     "cos_mean": sum(e["cos"] for e in si["entries"]) / len(si["entries"]),
                     "matrices": len(sp["entries"])}
    return out


def before(ref: str, root: Path, device: str) -> dict:
    """The same measurement on the code at git ref `ref`, in a child process."""
    with tempfile.TemporaryDirectory(prefix="bench-analysis-code-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        # This script runs from the current tree; only the imported project code is the old one.
        script = Path(tree) / "tests" / "benchmarks" / "_bench_analysis.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(__file__, script)
        env = {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
        res = subprocess.run([sys.executable, str(script), "--root", str(root), "--device", device],
                             check=True, capture_output=True, text=True, env=env, cwd=tree)
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder with base/, reasoner/, vlm/ (make_synthetic.py make)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--before", default=None, help="git ref of the code to time as well (e.g. HEAD)")
    a = ap.parse_args()
    root = Path(a.root)
    old = before(a.before, root, a.device) if a.before else None
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    out = measure(root, a.device)
    if old is not None:
        out["before"] = {"ref": a.before, **old}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
