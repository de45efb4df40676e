"""The app's worker at a realistic size: memory, merges, chat turns and analyses, against plain
transformers in the same run.

  python tests/benchmarks/bench_worker.py --shape qwen2-0.5b --work DIR --out R.json [--device cpu|cuda]

Builds (or reuses) a synthetic triple of that shape that transformers loads (a LLaVA VLM with a
small real vision tower and a processor, a reasoner and a base; tests/benchmarks/make_synthetic.py)
in DIR, starts the worker process exactly as the app does (webapp.ui.client.WorkerClient) and sends it
the app's jobs: a chat turn (loads the triple), a merge, a slider move (re-merge in place), two chat
turns with both panes, spectra and similarity cold then cached. The worker's resident memory is
sampled every 20 ms. In this process, after the worker is closed: one plain generate() of the same
prompt and token count. The slider move and what it replaces, a merge to disk followed by a reload
(in this process, the worker idle), are timed in turns, three of each: on a shared machine the
load changes by the minute, so the two are compared at the same moments. The medians are the
figures, with every time and the CPU seconds each took (the worker's, or this process's), which
depend less on the other processes' load.
Every generate makes exactly --tokens new tokens (generation_config.min_new_tokens), so the times
compare the same work. Writes JSON with the figures and their ratios, and plan_7b: the memory plan
the worker's own planner makes for a 7B pair on 24, 48 and 80 GB cards with 48 GiB of host RAM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

GiB = 2**30
QUESTION = "how many circles are there ?"


class PeakRSS:
    """The peak resident memory of a process (and its children), sampled in a thread; also the peak
    of its anonymous part (RSS less the file-backed and shared pages: the safetensors files mapped
    while a merge reads them count in RSS, yet the kernel can drop them at any time)."""

    def __init__(self, pid: int, every: float = 0.02):
        self.proc, self.every, self.peak, self.peak_anon = psutil.Process(pid), every, 0, 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                infos = [self.proc.memory_info()] + [c.memory_info() for c in self.proc.children(True)]
            except psutil.Error:
                infos = []
            self.peak = max(self.peak, sum(i.rss for i in infos))
            self.peak_anon = max(self.peak_anon, sum(i.rss - i.shared for i in infos))
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._th.join()
        return self.peak


def job(client, kind: str, args: dict, timeout: float = 3600) -> tuple[dict, float]:
    t0 = time.perf_counter()
    ev, payload = client.run(kind, args, timeout=timeout)
    secs = time.perf_counter() - t0
    if ev != "result":
        raise SystemExit(f"{kind} job ended with {ev}: {payload}")
    return payload, secs


def force_length(vlm: Path, tokens: int) -> None:
    """Every generate makes exactly `tokens` new tokens (random weights may emit EOS early)."""
    path = vlm / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg.update(min_new_tokens=tokens, max_new_tokens=tokens)
    path.write_text(json.dumps(cfg, indent=1))


def sample_image(size: int = 224):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    for i in range(3):
        d.ellipse((20 + 60 * i, 80, 70 + 60 * i, 130), fill="blue")
    return img


def plain_generate(vlm: Path, device: str, tokens: int, image_path: Path, cpu_dtype: str) -> float:
    """Seconds of one generate() with plain transformers, the same prompt and image the chat sends."""
    from merging.loading import load_model, prompt, user_turn
    from webapp.worker.models import serving_dtype

    model, proc = load_model(vlm, device, dtype=serving_dtype(device, cpu_dtype))
    from PIL import Image

    text = prompt(proc, [user_turn(QUESTION, True)])
    inputs = proc(text=[text], images=[Image.open(image_path).convert("RGB")], return_tensors="pt",
                  add_special_tokens=False).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    times = []
    for _ in range(2):  # the first call warms the kernels; the second is the figure
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        times.append(time.perf_counter() - t0)
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    del model
    return times[-1]


def disk_merge_reload(recipe: dict, device: str, cpu_dtype: str, work: Path) -> tuple[float, float]:
    from merging.engine import merge_to_disk
    from merging.loading import load_model
    from merging.recipe import from_dict
    from webapp.worker.models import serving_dtype

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        merge_to_disk(from_dict(recipe), Path(tmp) / "m", device=device, bar=False)
        model, _ = load_model(Path(tmp) / "m", device, dtype=serving_dtype(device, cpu_dtype))
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        del model
    return secs, cpu


def slider_vs_disk(client, recipe: dict, moved: dict, device: str, cpu_dtype: str, work: Path, out: dict) -> None:
    """Re-merges in place (alpha 0.6, 0.7, 0.6; the worker keeps one merged state, so each is a
    re-merge) in turns with disk merges + reloads of alpha 0.6; ends with alpha 0.6 live."""
    proc = psutil.Process(client.pid)
    disk_merge_reload(moved, device, cpu_dtype, work)  # untimed: the first in a process pays its imports
    moves, disks = [], []
    for alpha in (0.6, 0.7, 0.6):
        c0 = sum(proc.cpu_times()[:2])
        res, _ = job(client, "merge", {"recipe": {**recipe, "parameters": {"alpha": alpha}}})
        if res["reused"]:
            raise SystemExit(f"alpha {alpha} was a kept merge, not a re-merge")
        moves.append((res["merge_seconds"], sum(proc.cpu_times()[:2]) - c0))
        disks.append(disk_merge_reload(moved, device, cpu_dtype, work))
    for key, runs in (("inplace_remerge", moves), ("disk_merge_reload", disks)):
        out[f"{key}_s"] = round(statistics.median(s for s, _ in runs), 2)
        out[f"{key}s_s"] = [round(s, 2) for s, _ in runs]
        out[f"{key}s_cpu_s"] = [round(c, 2) for _, c in runs]


def elementwise_floor(triple: dict, device: str, cpu_dtype: str) -> float:
    """Seconds of the least any task-arithmetic re-merge can cost: v + a * (r - b) over tensors of the
    live LM's shapes, all already in memory in the serving dtype, written into a preallocated output.
    The in-place re-merge is compared with this (the worker re-reads r and b from the files)."""
    from merging.memory_plan import plan_triple
    from webapp.worker.models import serving_dtype, serving_itemsize

    p = plan_triple(triple["vlm"], triple["reasoner"], triple["base"], device, serving_itemsize(device, cpu_dtype))
    sd = serving_dtype(device, cpu_dtype)
    dtype = torch.bfloat16 if sd == "auto" else getattr(torch, sd)
    item = torch.empty((), dtype=dtype).element_size()
    total = 0.0
    for u in p.footprint.units:  # one layer at a time: the same working set as the worker's streamed merge
        if not u.changed:
            continue
        v, r, b, out = (torch.randn(u.changed // item, device=device).to(dtype) for _ in range(4))
        t0 = time.perf_counter()
        torch.sub(r, b, out=out)
        out.mul_(0.6).add_(v)
        if device != "cpu":
            torch.cuda.synchronize()
        total += time.perf_counter() - t0
    return total


def live_lm_bytes(triple: dict, device: str, cpu_dtype: str) -> int:
    from merging.memory_plan import plan_triple
    from webapp.worker.models import serving_itemsize

    p = plan_triple(triple["vlm"], triple["reasoner"], triple["base"], device, serving_itemsize(device, cpu_dtype))
    return sum(u.changed for u in p.footprint.units)


def ratios(out: dict) -> dict:
    """The figures against their references (the targets in comments)."""
    return {
        "peak_rss_over_live_lm": round(out["peak_rss_gib"] / out["live_lm_gib"], 2),  # target <= 2.2
        "peak_anon_rss_over_live_lm": round(out["peak_anon_rss_gib"] / out["live_lm_gib"], 2),
        "next_chat_turn_over_plain_generate": round(out["next_chat_turn_s"] / out["plain_generate_s"], 2),  # <= 2.5
        "disk_merge_reload_over_inplace_remerge": round(out["disk_merge_reload_s"] / out["inplace_remerge_s"], 1),
        "disk_merge_reload_over_inplace_remerge_cpu": round(statistics.median(out["disk_merge_reloads_cpu_s"])
                                                            / statistics.median(out["inplace_remerges_cpu_s"]), 1),
        "inplace_remerge_over_elementwise_floor": round(out["inplace_remerge_s"] / out["elementwise_floor_s"], 1),
        "disk_merge_reload_over_elementwise_floor": round(out["disk_merge_reload_s"] / out["elementwise_floor_s"], 1),
    }


def run(shape: str, work: Path, device: str, tokens: int, cpu_dtype: str, threads: int | None) -> dict:
    from merging.memory_plan import plan_7b
    from tests.benchmarks.make_synthetic import make_loadable
    from webapp.ui.client import WorkerClient

    t0 = time.perf_counter()
    paths = make_loadable(work, shape)["paths"]
    build_s = time.perf_counter() - t0
    triple = {"vlm": str(paths["vlm"]), "reasoner": str(paths["reasoner"]), "base": str(paths["base"])}
    force_length(Path(triple["vlm"]), tokens)
    image = work / "sample.png"
    sample_image().save(image)
    recipe = {**triple, "method": "task_arithmetic", "parameters": {"alpha": 0.5}}
    moved = {**recipe, "parameters": {"alpha": 0.6}}
    chat = {"recipe": moved, "triple": triple, "question": QUESTION, "image": str(image), "max_new_tokens": tokens}
    out: dict = {"shape": shape, "device": device, "cpu_dtype": cpu_dtype, "tokens": tokens,
                 "build_or_reuse_s": round(build_s, 1), "load": list(psutil.getloadavg())}

    cache = Path(tempfile.mkdtemp(prefix="bench-worker-cache-"))
    client = WorkerClient({"device": device, "cache_dir": str(cache), "threads": threads, "cpu_dtype": cpu_dtype})
    client.start()
    info = client.wait_ready(300)
    if info.get("state") != "ready":
        raise SystemExit(f"the worker did not start: {info}")
    peak = PeakRSS(client.pid)
    try:
        plan, _ = job(client, "plan", {"triple": triple})
        out["plan"] = plan["plan"]
        _, out["load_and_original_turn_s"] = job(client, "chat", {**chat, "recipe": None, "original": True})
        res, out["first_merge_job_s"] = job(client, "merge", {"recipe": recipe})
        out["first_merge_s"] = res["merge_seconds"]
        slider_vs_disk(client, recipe, moved, device, cpu_dtype, work, out)
        _, out["chat_turn_s"] = job(client, "chat", chat)  # both panes: the merge live, then the original
        _, out["next_chat_turn_s"] = job(client, "chat", chat)
        _, out["third_chat_turn_s"] = job(client, "chat", chat)
        a = {"triple": triple, "recipe": None}
        _, s1 = job(client, "analysis", {**a, "name": "spectra"})
        _, s2 = job(client, "analysis", {**a, "name": "similarity"})
        out["spectra_cold_s"], out["similarity_cold_s"] = round(s1, 2), round(s2, 2)
        out["spectra_similarity_cold_s"] = round(s1 + s2, 2)
        _, c1 = job(client, "analysis", {**a, "name": "spectra"})
        _, c2 = job(client, "analysis", {**a, "name": "similarity"})
        out["spectra_similarity_cached_s"] = round(c1 + c2, 2)
    finally:
        out["peak_rss_gib"] = round(peak.stop() / GiB, 3)
        out["peak_anon_rss_gib"] = round(peak.peak_anon / GiB, 3)
        client.close()
    out["live_lm_gib"] = round(live_lm_bytes(triple, device, cpu_dtype) / GiB, 3)
    out["plain_generate_s"] = round(plain_generate(Path(triple["vlm"]), device, tokens, image, cpu_dtype), 3)
    out["elementwise_floor_s"] = round(min(elementwise_floor(triple, device, cpu_dtype) for _ in range(2)), 3)
    for k in ("first_merge_job_s", "load_and_original_turn_s", "chat_turn_s", "next_chat_turn_s",
              "third_chat_turn_s"):
        out[k] = round(out[k], 2)
    out["ratios"], out["load_end"] = ratios(out), list(psutil.getloadavg())
    out["plan_7b"] = []
    for gpu in (24, 48, 80):
        p = plan_7b(gpu, 48)
        out["plan_7b"].append({"gpu_gib": gpu, "host_gib": 48, "fits": p.fits, "lines": p.lines(),
                               "placement": p.to_json()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2-0.5b")
    ap.add_argument("--work", required=True, help="folder of the synthetic triple (built once, then reused)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per generate")
    ap.add_argument("--cpu-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    res = run(a.shape, Path(a.work), a.device, a.tokens, a.cpu_dtype, a.threads)
    text = json.dumps(res, indent=1)
    Path(a.out).write_text(text + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("plan", "plan_7b")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
