"""Speed of the SVD paths: ip_merging vs task_arithmetic, cold spectra + similarity,
spectra served from the decomposition cache after a merge, per-matrix costs and a 7B projection.

Every row is measured in this one run, one after the other (the machine may be shared: compare
ratios of one run; the load average is printed with each row). Merges run as their own
processes (`python -m merging merge`), the analyses in-process after imports.

  python tests/benchmarks/bench_svd.py                       # CPU, writes svd_table.md in --root
  python tests/benchmarks/bench_svd.py --device cuda --out $OUT/svd_table.md   # a GPU machine
  python tests/benchmarks/bench_svd.py --before e14691e      # also the previous code, same run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "benchmarks")]

# Llama-2-7B's decoder (32 layers; q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008).
SHAPES_7B = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
LAYERS_7B = 32


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def triple_paths(root: Path, preset: str, **over) -> dict:
    from make_synthetic import make_triple

    if not (root / "base" / "config.json").exists():
        make_triple(root, preset, llm_vlm=False, **over)
    return {r: root / r for r in ("vlm", "reasoner", "base")}


def recipe(root: Path, tri: dict, method: str, knobs: dict) -> Path:
    path = root / f"bench_{method}.yaml"
    path.write_text(json.dumps({"vlm": str(tri["vlm"]), "reasoner": str(tri["reasoner"]),
                                "base": str(tri["base"]), "method": method, "parameters": knobs}))
    return path


def timed_merge(rec: Path, out: Path, device: str, cache: Path, code_root: Path = ROOT) -> float:
    """Wall seconds of one merge process (interpreter start and imports included)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "MERGE_LAB_CACHE": str(cache), "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "merging", "merge", str(rec), str(out), "--device", device,
                    "--no-progress"], check=True, env=env, cwd=code_root, stdout=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return secs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def before_tree(ref: str, dest: Path) -> Path:
    """The project at git ref `ref`, exported to dest (for the previous implementation's row)."""
    if not dest.exists():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def merge_rows(root: Path, device: str, before: str | None) -> list[dict]:
    """12-layer hidden-768 triple: task_arithmetic vs ip_merging (exact, threshold 0), cold and warm."""
    tri = triple_paths(root / "h768", "small", layers=12)
    ta = recipe(root, tri, "task_arithmetic", {})
    ip = recipe(root, tri, "ip_merging", {"threshold": 0.0, "top_fraction": 0.0, "svd": 1})
    cache = root / "cache_h768"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []

    def row(name, fn, note=""):
        ld = load()
        rows.append({"row": name, "s": fn(), "load": f"{ld} -> {load()}", "note": note})
        print(rows[-1], flush=True)

    row("task_arithmetic merge, 12L h768", lambda: timed_merge(ta, root / "out", device, cache))
    row("ip_merging merge (exact, every matrix), cold cache", lambda: timed_merge(ip, root / "out", device, cache))
    if before:
        old = before_tree(before, root / f"before_{before}")
        row(f"ip_merging merge, code at {before}", lambda: timed_merge(ip, root / "out", device, cache, old))
    row("task_arithmetic merge, again", lambda: timed_merge(ta, root / "out", device, cache))
    from analysis import spectra

    row("spectra (k 64) after the ip_merging merge, from the decomposition cache",
        lambda: timed(lambda: spectra.spectra(*tri.values(), k=64, method="exact", device=device,
                                              cache_dir=cache, use_cache=True)), "first call: reads + hashes")
    row("spectra (k 48) again: by the fingerprints' aliases, no tensor read",
        lambda: timed(lambda: spectra.spectra(*tri.values(), k=48, method="exact", device=device,
                                              cache_dir=cache, use_cache=True)))
    row("ip_merging merge, decomposition cache warm", lambda: timed_merge(ip, root / "out", device, cache))
    return rows


def analysis_rows(root: Path, device: str) -> list[dict]:
    """Qwen2-0.5B shape: cold spectra, then similarity (its decompositions already cached)."""
    from analysis import similarity, spectra

    tri = triple_paths(root / "qwen05", "qwen2-0.5b")
    cache = root / "cache_qwen05"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for name, fn in (("cold spectra (k 64), Qwen2-0.5B shape", lambda: spectra.spectra(
                          *tri.values(), k=64, method="exact", device=device, cache_dir=cache)),
                     ("then similarity (rank 32)", lambda: similarity.similarity(
                          *tri.values(), rank=32, method="exact", device=device, cache_dir=cache))):
        ld = load()
        rows.append({"row": name, "s": timed(fn), "load": f"{ld} -> {load()}", "note": ""})
        print(rows[-1], flush=True)
    rows.append({"row": "cold spectra + similarity, Qwen2-0.5B shape", "s": rows[-2]["s"] + rows[-1]["s"],
                 "load": "", "note": "sum of the two rows above"})
    return rows


def _best(fn, n: int = 2) -> float:
    fn()  # warm-up (allocations, lazy library init)
    return min(timed(fn) for _ in range(n))


def _costs_at(n: int, device: str) -> dict:
    from merging import linalg

    g = torch.Generator().manual_seed(n)
    sq = torch.randn(n, n, generator=g).to(device)
    tall = torch.randn(n * 11008 // 4096, n, generator=g).to(device)
    gram = sq.double().mT @ sq.double()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(fn):
        return _best(lambda: (fn(), sync()))
    return {"gram_square": run(lambda: sq.double().mT @ sq.double()),
            "gram_tall": run(lambda: tall.double().mT @ tall.double()),
            "eigh": run(lambda: linalg.eigh(gram)),
            "eigvalsh": run(lambda: linalg.eigh(gram, values_only=True)),
            "lowrank_tall": run(lambda: torch.svd_lowrank(tall, q=42, niter=4))}


def per_matrix_costs(device: str) -> dict:
    """Seconds of the float64 Gram and of eigh (with vectors / values only) per Gram size n,
    measured on `device` (CPU: n up to 2048, projected to 4096 by n^3; CUDA: the 7B shapes)."""
    out = {}
    for n in ([768, 2048] if device == "cpu" else [768, 2048, 4096]):
        out[n] = _costs_at(n, device)
        print(n, out[n], flush=True)
    return out


def thread_rows() -> list[dict]:
    """Why small CPU eighs run on one thread: the same eigh at the default thread count, unguarded."""
    from merging import linalg

    m = torch.randn(2048, 768, dtype=torch.float64)
    g = m.mT @ m
    rows = []
    for name, fn in (("eigh 768 x 768, one thread (linalg.eigh)", lambda: linalg.eigh(g)),
                     (f"eigh 768 x 768, {torch.get_num_threads()} threads (torch.linalg.eigh)",
                      lambda: torch.linalg.eigh(g))):
        ld = load()
        rows.append({"row": name, "s": _best(fn, 3), "load": f"{ld} -> {load()}", "note": "best of 3"})
        print(rows[-1], flush=True)
    return rows


def project_7b(costs: dict) -> dict:
    """7B triple (224 matrices, 448 task vectors) from measured per-matrix costs; on the CPU the
    sizes above the largest measured are scaled."""
    n_max = max(costs)
    # Gram (2 m n^2, m proportional to n) and eigh are cubic in n; svd_lowrank (m n q) quadratic.
    c = {k: v * (4096 / n_max) ** (2 if k.startswith("lowrank") else 3) for k, v in costs[n_max].items()}
    per_layer_exact = (SHAPES_7B[(4096, 4096)] * c["gram_square"] + 3 * c["gram_tall"] + 7 * c["eigh"])
    per_layer_auto = (SHAPES_7B[(4096, 4096)] * c["gram_square"] + 3 * c["gram_tall"] + 7 * c["eigvalsh"]
                      + 3 * c["lowrank_tall"] + 4 * c["lowrank_tall"] * 4096 / 11008)
    return {"measured_at_n": n_max, "exact_s": 2 * LAYERS_7B * per_layer_exact,
            "auto_s": 2 * LAYERS_7B * per_layer_auto, "per_matrix": c}


def table(rows: list[dict], proj: dict, device: str) -> str:
    ta = [r["s"] for r in rows if r["row"].startswith("task_arithmetic")]
    lines = [f"device {device}; {os.cpu_count()} cores; torch {torch.__version__}; "
             f"torch threads {torch.get_num_threads()}",
             "", "| row | seconds | vs task_arithmetic (mean of its runs) | load avg 1/5/15 min (start -> end) | note |",
             "|---|---|---|---|---|"]
    ref = sum(ta) / len(ta) if ta else float("nan")
    for r in rows:
        rel = f"{r['s'] / ref:.2f}x" if "merge" in r["row"] else ""
        lines.append(f"| {r['row']} | {r['s']:.2f} | {rel} | {r['load']} | {r['note']} |")
    c = proj["per_matrix"]
    lines += ["", f"7B projection (exact, every matrix, both task vectors; per-matrix costs measured at "
              f"n = {proj['measured_at_n']}{' and scaled to 4096' if proj['measured_at_n'] < 4096 else ''}):",
              f"Gram 4096 x 4096 {c['gram_square']:.2f} s, Gram of 11008 x 4096 {c['gram_tall']:.2f} s, "
              f"eigh 4096 {c['eigh']:.2f} s, eigvalsh 4096 {c['eigvalsh']:.2f} s, "
              f"svd_lowrank 11008 x 4096 {c['lowrank_tall']:.2f} s per matrix;",
              f"decompositions of a 7B triple: exact {proj['exact_s'] / 60:.1f} min, "
              f"auto (randomized basis, exact nuclear norms) {proj['auto_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/mergelab-svd-bench")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="where to write the table (default ROOT/svd_table.md)")
    ap.add_argument("--before", default=None, help="git ref of a previous implementation to time too")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: merge,analysis,threads,costs")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    rows = [] if "merge" in skip else merge_rows(root, a.device, a.before)
    rows += [] if "analysis" in skip else analysis_rows(root, a.device)
    rows += [] if "threads" in skip or a.device != "cpu" else thread_rows()
    proj = project_7b(per_matrix_costs(a.device)) if "costs" not in skip else {"per_matrix": {}}
    text = table(rows, proj, a.device) if "costs" not in skip else json.dumps(rows, indent=1)
    out = Path(a.out) if a.out else root / "svd_table.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
