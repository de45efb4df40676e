"""In-place re-merge vs reload + merge from disk, and the app's chat path vs plain generate().

Not part of the normal test run. Everything is measured in one process, in one run, so the
ratios are meaningful even on a shared machine (absolute figures are not):

  .venv/bin/python tests/benchmarks/bench_inplace_chat.py [--synthetic] [--repeats 10] [--chat-repeats 15]

1. Slider move: InPlaceMerger.apply(task_arithmetic alpha 0.6) after a first apply with alpha
   0.5 (median of --repeats) vs merge_to_disk of the same recipe into a temp folder followed by
   AutoModelForImageTextToText.from_pretrained of it (median of 3), on assets/toy; with
   --synthetic also on a larger synthetic LLaVA triple (8 layers, hidden 512, tests/factories.py).
2. Chat: webapp.worker.chat.stream_answer (the worker's streamed generation, called in-process) vs a
   plain processor + model.generate() on the same toy VLM, sample image + question, greedy,
   max_new_tokens 32 forced to full length with generation_config.min_new_tokens (median of
   --chat-repeats each, interleaved). Time to first token: the first on_text piece for the app
   (what the user sees), a 1-token generate() for the plain path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TOY = ROOT / "assets" / "toy"


def _recipe(vlm, reasoner, base, alpha):
    from merging.recipe import from_dict

    return from_dict({"vlm": str(vlm), "reasoner": str(reasoner), "base": str(base),
                      "method": "task_arithmetic", "parameters": {"alpha": alpha}})


def bench_remerge(label, vlm, reasoner, base, repeats):
    from transformers import AutoModelForImageTextToText

    from merging.engine import merge_to_disk
    from merging.inplace import InPlaceMerger

    model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch.float32).eval()
    merger = InPlaceMerger(model, str(vlm), str(reasoner), str(base), device="cpu")
    r05, r06 = _recipe(vlm, reasoner, base, 0.5), _recipe(vlm, reasoner, base, 0.6)
    inplace = []
    for _ in range(repeats):
        merger.apply(r05)
        t0 = time.perf_counter()
        merger.apply(r06)
        inplace.append(time.perf_counter() - t0)
    merger.restore()
    disk = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(3):
            out = Path(tmp) / f"m{i}"
            t0 = time.perf_counter()
            merge_to_disk(r06, out, bar=False)
            m = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
            disk.append(time.perf_counter() - t0)
            if i == 0:  # sanity: the in-place merge equals the folder
                merger.apply(r06)
                a, b = dict(model.named_parameters()), dict(m.named_parameters())
                diff = max((a[n] - b[n]).abs().max().item() for n in a)
                merger.restore()
            del m
    ip, dk = statistics.median(inplace), statistics.median(disk)
    return {"label": label, "inplace_s": ip, "disk_s": dk, "ratio": dk / ip, "max_abs_diff": diff,
            "n_inplace": len(inplace), "n_disk": len(disk)}


def bench_chat(repeats, max_new_tokens=32):
    import json

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from webapp.worker.chat import build_messages, stream_answer

    model = AutoModelForImageTextToText.from_pretrained(TOY / "vlm", dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(TOY / "vlm")
    model.generation_config.min_new_tokens = max_new_tokens  # force full length on both paths
    sample = json.loads((TOY / "samples" / "samples.json").read_text())[1]
    image = Image.open(TOY / "samples" / sample["image"]).convert("RGB")
    question = sample["question"]
    tok = proc.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def plain(n):
        prompt = proc.apply_chat_template(build_messages([], question, True), tokenize=False,
                                          add_generation_prompt=True)
        inputs = proc(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return out.shape[1] - inputs["input_ids"].shape[1]

    def app():
        first = []
        t0 = time.perf_counter()
        text = stream_answer(model, proc, question, image=image, max_new_tokens=max_new_tokens,
                             on_text=lambda piece: first or first.append(time.perf_counter()))
        return time.perf_counter() - t0, first[0] - t0, text

    plain(max_new_tokens), app()  # warm-up
    p_tot, p_ttft, a_tot, a_ttft = [], [], [], []
    for _ in range(repeats):  # interleaved so that load changes hit both paths alike
        t0 = time.perf_counter()
        n = plain(max_new_tokens)
        p_tot.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain(1)
        p_ttft.append(time.perf_counter() - t0)
        tot, ttft, text = app()
        a_tot.append(tot)
        a_ttft.append(ttft)
    n_app = len(tok(text, add_special_tokens=False)["input_ids"])
    pt, at = statistics.median(p_tot), statistics.median(a_tot)
    return {"tokens": n, "app_text_tokens": n_app, "plain_tps": n / pt, "app_tps": n / at,
            "plain_ttft": statistics.median(p_ttft), "app_ttft": statistics.median(a_ttft),
            "overhead_pct": 100 * (at - pt) / pt, "answer": text}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="in-place applies")
    ap.add_argument("--chat-repeats", type=int, default=15, help="generations per chat path")
    ap.add_argument("--synthetic", action="store_true", help="also an 8-layer, hidden-512 synthetic LLaVA")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = [bench_remerge("toy family", TOY / "vlm", TOY / "math", TOY / "base", args.repeats)]
    if args.synthetic:
        import tests.factories as f

        with tempfile.TemporaryDirectory() as tmp:

            f.TEXT = {**f.TEXT, "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
                      "num_key_value_heads": 4, "vocab_size": 4096}
            tri = f.make_tiny_triple(Path(tmp), num_layers=8, layout="new")
            rows.append(bench_remerge("synthetic LLaVA 8x512", tri["vlm"], tri["reasoner"], tri["base"],
                                      args.repeats))
    print("\n## In-place re-merge (task_arithmetic alpha 0.5 -> 0.6) vs merge_to_disk + from_pretrained")
    print("| model | in-place s (median) | merge+load s (median) | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['inplace_s']:.4f} (n={r['n_inplace']}) | {r['disk_s']:.3f} (n={r['n_disk']}) "
              f"| {r['ratio']:.1f}x | {r['max_abs_diff']:.1e} |")
    c = bench_chat(args.chat_repeats)
    print("\n## Chat, toy VLM, greedy, 32 new tokens (forced)")
    print("| path | tokens/s (median) | time to first token s (median) |")
    print("|---|---|---|")
    print(f"| plain processor + generate() | {c['plain_tps']:.1f} | {c['plain_ttft']:.4f} |")
    print(f"| webapp.worker.chat.stream_answer | {c['app_tps']:.1f} | {c['app_ttft']:.4f} |")
    print(f"overhead of the app path in total time: {c['overhead_pct']:+.1f}% "
          f"({c['tokens']} tokens generated; app answer re-tokenizes to {c['app_text_tokens']})")
    print(f"app answer: {c['answer'][:120]!r}")
    toy = rows[0]
    print(f"\ntargets: in-place >= 10x and < 0.2 s on the toy family: "
          f"{'met' if toy['ratio'] >= 10 and toy['inplace_s'] < 0.2 else 'missed'}; "
          f"chat overhead < 5%: {'met' if c['overhead_pct'] < 5 else 'missed'}")


if __name__ == "__main__":
    main()
