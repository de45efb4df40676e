"""Synthetic model triples with real shapes and random data, and a merge time/memory probe.

No transformers model is built: safetensors are written directly, tensor by tensor, so a
Qwen2-0.5B-shaped triple takes seconds and little memory. The VLM is LLaVA-wrapped
(transformers 5 names) around the same LM with a token vision tower + projector: enough for the
merge engine, not loadable by transformers (the vision tower is not a full CLIP).

  python tests/benchmarks/make_synthetic.py make /tmp/syn --preset qwen2-0.5b
  python tests/benchmarks/make_synthetic.py measure /tmp/syn/recipe_ties.yaml /tmp/syn/out_ties
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = {
    # Qwen2-0.5B: 24 layers, hidden 896, intermediate 4864, 14 heads, 2 kv heads, tied embeddings.
    "qwen2-0.5b": dict(layers=24, hidden=896, inter=4864, vocab=151936, heads=14, kv=2, dtype="bfloat16"),
    # ~160 MB float32 per model: the memory test's checkpoint.
    "small": dict(layers=6, hidden=768, inter=2048, vocab=1000, heads=12, kv=12, dtype="float32"),
}
METHODS = ("task_arithmetic", "ties", "ip_merging")


def lm_shapes(c: dict) -> dict[str, tuple]:
    """Canonical Qwen2 LM tensors (q/k/v carry biases; embeddings tied: no lm_head)."""
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    kvd = c["kv"] * hd
    s = {"embed_tokens.weight": (c["vocab"], h)}
    for i in range(c["layers"]):
        p = f"layers.{i}."
        s.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                  p + "self_attn.k_proj.weight": (kvd, h), p + "self_attn.k_proj.bias": (kvd,),
                  p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.v_proj.bias": (kvd,),
                  p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (c["inter"], h),
                  p + "mlp.up_proj.weight": (c["inter"], h), p + "mlp.down_proj.weight": (h, c["inter"])})
    s["norm.weight"] = (h,)
    return s


VISION = {"model.vision_tower.vision_model.embeddings.patch_embedding.weight": (64, 3, 14, 14),
          "model.vision_tower.vision_model.post_layernorm.weight": (64,),
          "model.multi_modal_projector.linear_1.weight": None, "model.multi_modal_projector.linear_2.weight": None}


def text_config(c: dict) -> dict:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": c["hidden"],
            "intermediate_size": c["inter"], "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
            "num_key_value_heads": c["kv"], "vocab_size": c["vocab"], "tie_word_embeddings": True,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "torch_dtype": c["dtype"]}


def make_triple(root: Path, preset: str = "qwen2-0.5b", shard_mb: int = 500, seed: int = 0,
                llm_vlm: bool = True, **over) -> dict:
    """Write root/{base,reasoner,vlm,vlm_llm} and root/recipe_<method>.yaml. Returns the paths.
    vlm_llm (the VLM's LM as a text LLM, for LLM-only tools like mergekit) only when llm_vlm."""
    from merging.writer import ShardedWriter

    c = {**PRESETS[preset], **over}
    dtype = getattr(torch, c["dtype"])
    root = Path(root)
    shapes = lm_shapes(c)
    vision = {k: (v or ((c["hidden"], 64) if k.endswith("linear_1.weight") else (c["hidden"], c["hidden"])))
              for k, v in VISION.items()}
    names = {
        "base": {k: "model." + k for k in shapes}, "reasoner": {k: "model." + k for k in shapes},
        "vlm_llm": {k: "model." + k for k in shapes},
        "vlm": {k: "model.language_model." + k for k in shapes},
    }
    if not llm_vlm:
        del names["vlm_llm"]
    writers = {}
    for role, nm in names.items():
        (root / role).mkdir(parents=True, exist_ok=True)
        entries = [(nm[k], shapes[k], dtype) for k in shapes]
        if role == "vlm":
            entries += [(k, s, dtype) for k, s in vision.items()]
            cfg = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                   "text_config": text_config(c), "image_token_index": c["vocab"] - 1,
                   "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64}}
        else:
            cfg = text_config(c)
        (root / role / "config.json").write_text(json.dumps(cfg, indent=2))
        writers[role] = ShardedWriter(root / role, entries, shard_mb * 10**6)
    gen = torch.Generator().manual_seed(seed)
    for k, shape in shapes.items():
        base = torch.randn(shape, generator=gen) * 0.02 + (1.0 if len(shape) == 1 else 0.0)
        vlm = base + torch.randn(shape, generator=gen) * 0.002  # fine-tunes: small moves off the base
        outs = {"base": base, "reasoner": base + torch.randn(shape, generator=gen) * 0.003, "vlm_llm": vlm, "vlm": vlm}
        for role, t in outs.items():
            if role in writers:
                writers[role].write(names[role][k], t.to(dtype))
    for k, shape in vision.items():
        writers["vlm"].write(k, (torch.randn(shape, generator=gen) * 0.02).to(dtype))
    for w in writers.values():
        w.finish()
    for m in METHODS:
        (root / f"recipe_{m}.yaml").write_text(
            f"vlm: {root / 'vlm'}\nreasoner: {root / 'reasoner'}\nbase: {root / 'base'}\nmethod: {m}\n")
    return {r: root / r for r in names}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(recipe_path: str, out_dir: str, device: str = "cpu") -> dict:
    """Merge in this process; peak anonymous RSS growth (sampled every 2 ms) and wall time.

    Anonymous memory is what the merge allocates; file-backed pages of the memory-mapped inputs
    also count in plain RSS (VmHWM) but are reclaimable page cache, so both are reported."""
    from merging import recipe as recipe_mod
    from merging.engine import merge_to_disk

    rec = recipe_mod.load(recipe_path)
    base_anon, base_hwm = _status("RssAnon"), _status("VmHWM")
    peak = [base_anon]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    merge_to_disk(rec, out_dir, device=device, bar=False)
    secs = time.time() - t0
    done.set()
    th.join()
    size = sum(f.stat().st_size for f in Path(rec.vlm).glob("*.safetensors"))
    return {"method": rec.method, "seconds": round(secs, 2), "vlm_bytes": size,
            "peak_anon_growth_bytes": peak[0] - base_anon, "rss_hwm_growth_bytes": _status("VmHWM") - base_hwm}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write a synthetic triple")
    mk.add_argument("root")
    mk.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS))
    mk.add_argument("--shard-mb", type=int, default=500)
    ms = sub.add_parser("measure", help="merge a recipe; print time and peak memory as JSON")
    ms.add_argument("recipe")
    ms.add_argument("out_dir")
    ms.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        t0 = time.time()
        make_triple(Path(a.root), a.preset, a.shard_mb)
        print(f"wrote {a.root} in {time.time() - t0:.1f} s")
    else:
        torch.set_grad_enabled(False)
        print(json.dumps(measure(a.recipe, a.out_dir, a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
