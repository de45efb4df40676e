"""Streaming merge vs mergekit vs the I/O floor, on a synthetic Qwen2-0.5B-shaped LLM triple.

Not part of the normal test run. Each contender runs as its own process; wall time and the
peak RSS of that process (os.wait4's ru_maxrss) are measured the same way for all, on the same
files, in the same run, and printed side by side as ratios.

  python tests/benchmarks/bench_merge.py [--root /tmp/mergelab-bench] [--methods task_arithmetic,ties,dare_ties]

mergekit is installed by the benchmark into its own venv (--mergekit-venv), never into the
project's: pip install torch==2.13.0 mergekit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

KNOBS = {"task_arithmetic": {"alpha": 0.5}, "ties": {"alpha": 0.5, "density": 0.5},
         "dare_ties": {"alpha": 0.5, "density": 0.5}, "dare_linear": {"alpha": 0.5, "density": 0.5}}


def run_measured(cmd: list[str], env=None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes of the process (and its waited children), and its output."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    out = p.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out[-3000:]}")
    return secs, ru.ru_maxrss * 1024, out


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["mergekit"], check=True)
    return exe


def mergekit_config(method: str, tri: dict, knobs: dict) -> str:
    density = knobs.get("density")
    p_vlm = {"weight": 1.0} | ({"density": density} if density else {})
    p_r = {"weight": knobs["alpha"]} | ({"density": density} if density else {})
    glob = {"normalize": method in ("ties", "dare_ties")} if method != "task_arithmetic" else {"normalize": False}
    cfg = {"merge_method": method, "base_model": str(tri["base"]), "dtype": "float32", "out_dtype": "bfloat16",
           "parameters": glob,
           "models": [{"model": str(tri["vlm_llm"]), "parameters": p_vlm},
                      {"model": str(tri["reasoner"]), "parameters": p_r}]}
    return json.dumps(cfg)  # JSON is YAML


def io_floor_script(inputs: list[Path], out_bytes: int, out_file: Path) -> list[str]:
    """Read every input byte once and write out_bytes once: what no merge can beat."""
    code = f"""
import os
buf = bytearray(16 << 20)
for f in {[str(p) for p in inputs]!r}:
    with open(f, 'rb', buffering=0) as fh:
        while fh.readinto(buf):
            pass
left = {out_bytes}
with open({str(out_file)!r}, 'wb') as fh:
    while left > 0:
        n = min(left, len(buf)); fh.write(memoryview(buf)[:n]); left -= n
"""
    return [sys.executable, "-c", code]


def compare_outputs(ours: Path, theirs: Path) -> float:
    """Largest |ours - mergekit| over the LM tensors (bf16 outputs, fp32 compute in both)."""
    from merging.checkpoint import Checkpoint

    worst = 0.0
    with Checkpoint.open(ours) as a, Checkpoint.open(theirs) as b:
        for n in a.names():
            if b.has(n):
                worst = max(worst, float((a.get(n).float() - b.get(n).float()).abs().max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/mergelab-bench")
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--mergekit-venv", default="/tmp/mergekit-venv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="qwen2-0.5b")
    a = ap.parse_args()
    from make_synthetic import make_triple

    root = Path(a.root)
    if not (root / "base" / "config.json").exists():
        t0 = time.time()
        make_triple(root, a.preset)
        print(f"synthetic {a.preset} triple written in {time.time() - t0:.1f} s")
    tri = {r: root / r for r in ("base", "reasoner", "vlm_llm")}
    inputs = sorted(p for r in tri.values() for p in r.glob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in inputs)
    mk = ensure_mergekit(Path(a.mergekit_venv))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    rows = []
    for method in a.methods.split(","):
        knobs = KNOBS[method]
        recipe = root / f"bench_{method}.yaml"
        recipe.write_text(json.dumps({"vlm": str(tri["vlm_llm"]), "reasoner": str(tri["reasoner"]), "base": str(tri["base"]),
                                      "method": method, "parameters": knobs, "out_dtype": "bfloat16", "seed": 0,
                                      "embeddings": "merge_shared_rows"}))
        ours, theirs = root / f"out_ours_{method}", root / f"out_mergekit_{method}"
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
        t_ours, m_ours, _ = run_measured([sys.executable, "-m", "merging", "merge", str(recipe), str(ours),
                                          "--device", a.device, "--no-progress"], env)
        # the engine's own time (model card), without interpreter start and `import torch` (~1.5 s here)
        t_engine = float(re.search(r"merge time: ([0-9.]+) s", (ours / "README.md").read_text()).group(1))
        cfg = root / f"mergekit_{method}.yaml"
        cfg.write_text(mergekit_config(method, tri, knobs))
        mk_cmd = [str(mk), str(cfg), str(theirs), "--no-copy-tokenizer", "--quiet", "--lazy-unpickle",
                  "--random-seed", "0"] + (["--cuda"] if a.device == "cuda" else [])
        t_mk, m_mk, _ = run_measured(mk_cmd, env)
        out_bytes = sum(p.stat().st_size for p in ours.glob("*.safetensors"))
        floor_file = root / "floor.bin"
        t_floor, m_floor, _ = run_measured(io_floor_script(inputs, out_bytes, floor_file), env)
        floor_file.unlink(missing_ok=True)
        diff = compare_outputs(ours, theirs)
        rows.append(dict(method=method, ours_s=t_ours, engine_s=t_engine, mergekit_s=t_mk, floor_s=t_floor, ours_mb=m_ours / 2**20,
                         mergekit_mb=m_mk / 2**20, max_abs_diff=diff))
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
    print(f"\ninputs: {len(inputs)} files, {in_bytes / 2**30:.2f} GiB; device {a.device}; cores {os.cpu_count()}")
    print("| method | ours s | mergekit s | ours/mergekit | I/O floor s | ours/floor | ours engine s | engine/floor | "
          "ours peak RSS MiB | mergekit peak RSS MiB | ours/mergekit RSS | max abs diff vs mergekit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ours_s']:.1f} | {r['mergekit_s']:.1f} | {r['ours_s'] / r['mergekit_s']:.2f} | "
              f"{r['floor_s']:.1f} | {r['ours_s'] / r['floor_s']:.2f} | {r['engine_s']:.1f} | "
              f"{r['engine_s'] / r['floor_s']:.2f} | {r['ours_mb']:.0f} | {r['mergekit_mb']:.0f} | "
              f"{r['ours_mb'] / r['mergekit_mb']:.2f} | {r['max_abs_diff']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
