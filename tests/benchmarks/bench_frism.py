"""FRISM's gate learning at a realistic size: time, memory held, and the planner's figure beside it.

  python tests/benchmarks/bench_frism.py --work DIR --out R.json [--device cpu|cuda] [--steps 4]

Builds (or reuses) the loadable synthetic triple of tests/benchmarks/make_synthetic.py (Qwen2-0.5B
shape by default, bfloat16 files), writes a prompts JSONL of --examples small coloured images, and
runs a `frism` merge to disk in this process on --device. Writes JSON with: the seconds of the
merge (learning included), the peak memory the device held during it (torch's peak allocation on
CUDA; the process's peak resident set on a CPU), and what this script computes from the VLM's
safetensors headers alone as the learning's holding (the VLM's tensors plus, for each gated decoder
matrix, its task vector and its gated weight, in bfloat16 on CUDA and float32 on a CPU, the learning
dtypes), so the ratio
measured / computed says how much activations and the optimiser add. Also the KL at the first and
last step and the losses, from the merge report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

GiB = 2**30


def prompts_file(folder: Path, n: int) -> Path:
    """n coloured 64x64 images with a question each (FRISM reads the image and the question)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (64, 64), ((37 * i) % 256, 90, (200 + 11 * i) % 256)).save(folder / f"p{i}.png")
        lines.append(json.dumps({"question": "how many circles are there ?", "answer": "-", "image": f"p{i}.png"}))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def computed_bytes(vlm: Path, device: str) -> dict:
    """From the headers alone: every VLM tensor, and twice each 2-D tensor of a language-model decoder
    layer (what FRISM gates: its task vector, and the gated weight the forward uses), at 2 bytes on
    CUDA (the bfloat16 checkpoint) and 4 on a CPU."""
    from safetensors import safe_open

    per = 4 if device == "cpu" else 2
    vlm_b = gated_b = 0
    for f in sorted(vlm.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = sf.get_slice(name).get_shape()
                vlm_b += math.prod(shape) * per
                if "language_model" in name and ".layers." in name and len(shape) == 2:
                    gated_b += math.prod(shape) * per
    return {"vlm_gib": vlm_b / GiB, "task_vectors_gib": gated_b / GiB, "gated_weights_gib": gated_b / GiB,
            "total_gib": (vlm_b + 2 * gated_b) / GiB}


def run(work: Path, shape: str, device: str, steps: int, examples: int) -> dict:
    from bench_worker import PeakRSS

    from merging.engine import merge_to_disk
    from merging.recipe import from_dict
    from tests.benchmarks.make_synthetic import make_loadable

    t0 = time.perf_counter()
    paths = make_loadable(work, shape)["paths"]
    build_s = time.perf_counter() - t0
    prompts = prompts_file(work / "frism_prompts", examples)
    rec = from_dict({"vlm": str(paths["vlm"]), "reasoner": str(paths["reasoner"]), "base": str(paths["base"]),
                     "method": "frism", "prompts": str(prompts),
                     "parameters": {"steps": steps, "examples": examples, "rank": 16, "groups": 4, "beta": 0.2}})
    out = work / f"frism_out_{device}"
    os.environ["MERGE_LAB_CACHE"] = tempfile.mkdtemp(prefix="bench-frism-cache-")  # learn, never reuse
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRSS(os.getpid())
    t0 = time.perf_counter()
    merge_to_disk(rec, out, device=device, overwrite=True)
    seconds = time.perf_counter() - t0
    rss.stop()
    learned = json.loads((out / "merge_report.json").read_text())["diagnostics"]["frism"]
    assert learned["learned"] and not learned["cached"], "the gates came from a cache: nothing was measured"
    peak = torch.cuda.max_memory_allocated() / GiB if device == "cuda" else rss.peak / GiB
    comp = computed_bytes(Path(paths["vlm"]), device)
    return {"shape": shape, "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "build_s": build_s, "steps": steps, "examples": examples, "merge_s": seconds,
            "peak_gib": peak, "peak_kind": "torch max_memory_allocated" if device == "cuda" else "process peak RSS",
            "computed": comp, "peak_over_computed": peak / comp["total_gib"],
            "learning_s": learned["seconds"], "kl_start": learned["kl_start"], "kl_end": learned["kl_end"],
            "losses": learned["losses"],
            "load": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder of the synthetic triple (built once, then reused)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--shape", default="qwen2-0.5b")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--examples", type=int, default=8)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    res = run(Path(a.work), a.shape, a.device, a.steps, a.examples)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
