"""Synthetic model triples with real shapes and random data, and a merge time/memory probe.

`make`: no transformers model is built: safetensors are written directly, tensor by tensor, so a
Qwen2-0.5B-shaped triple takes seconds and little memory. The VLM is LLaVA-wrapped
(transformers 5 names) around the same LM with a token vision tower + projector: enough for the
merge engine, not loadable by transformers (the vision tower is not a full CLIP).

`make-loadable`: a triple transformers loads and the app chats with: vlm/ is a
LlavaForConditionalGeneration (Qwen2 LM of the preset's shape, a small real CLIP vision tower,
processor + chat template beside it), reasoner/ and base/ are Qwen2ForCausalLM; one byte-level
BPE tokenizer, Qwen2's pipeline, covers every vocabulary id. Weights are still streamed to bf16
shards (the models are only built on the meta device, for their tensor names and shapes).
Skipped when DIR already holds the same build (--force rebuilds).

  python tests/benchmarks/make_synthetic.py make /tmp/syn --preset qwen2-0.5b
  python tests/benchmarks/make_synthetic.py make-loadable /tmp/syn-hf --preset qwen2-0.5b
  python tests/benchmarks/make_synthetic.py measure /tmp/syn/recipe_ties.yaml /tmp/syn/out_ties
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.benchmarks.synthetic_tokenizer import build_tokenizer  # noqa: E402

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


# ------------------------------------------------------------------------- loadable triples
# Qwen2 LMs (tied embeddings, as the real 0.5B and 1.5B) and the CLIP tower beside each.
LOADABLE = {
    "qwen2-0.5b": dict(layers=24, hidden=896, inter=4864, heads=14, kv=2, vocab=151936, vision="clip-b16"),
    "qwen2-1.5b": dict(layers=28, hidden=1536, inter=8960, heads=12, kv=2, vocab=151936, vision="clip-b16"),
    "tiny": dict(layers=2, hidden=64, inter=128, heads=4, kv=2, vocab=2048, vision="tiny"),  # tests: seconds
}
# CLIP ViT-B/16 widths at 224 px with 4 of its 12 layers: a real tower's shapes, 29M parameters.
VISION_TOWERS = {
    "clip-b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                     image_size=224, patch_size=16),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=16),
}
PAD, UNK, BOS, EOS, IMAGE = range(5)
STAMP = "synthetic_family.json"
NOISE = {"vlm": 0.002, "reasoner": 0.003}  # std of each fine-tune's move off the base (base: 0.02)
CHUNK_ELEMS = 1 << 24  # rows of a big tensor drawn at a time: bounded memory for any vocabulary


def loadable_configs(preset: str):
    """(Qwen2Config, LlavaConfig, number of image tokens) of a preset."""
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    c, v = LOADABLE[preset], VISION_TOWERS[LOADABLE[preset]["vision"]]
    text = Qwen2Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                       num_key_value_heads=c["kv"], max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=PAD, dtype="bfloat16")
    text.architectures = ["Qwen2ForCausalLM"]
    image_tokens = (v["image_size"] // v["patch_size"]) ** 2  # "default" strategy drops CLS
    vlm = LlavaConfig(vision_config=CLIPVisionConfig(**v, projection_dim=v["hidden_size"]).to_dict(),
                      text_config=text.to_dict(), image_token_index=IMAGE, image_seq_length=image_tokens,
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      projector_hidden_act="gelu", tie_word_embeddings=True, pad_token_id=PAD, dtype="bfloat16")
    vlm.architectures = ["LlavaForConditionalGeneration"]
    return text, vlm, image_tokens


def _meta_entries(cls, config) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor the class saves, from a model built on the meta device
    (no memory); the tied lm_head is left out as save_pretrained does."""
    with torch.device("meta"):
        model = cls(config)
    sd = model.state_dict()
    if config.get_text_config().tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return [(k, tuple(t.shape)) for k, t in sd.items()]


def _draw(shape: tuple, gen: torch.Generator, norm: bool, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """N(0, 0.02) (norm weights: 1 + that), rows start..stop of the first dimension when given."""
    if rows is not None:
        shape = (rows[1] - rows[0], *shape[1:])
    t = torch.randn(shape, generator=gen).mul_(0.02)
    return t.add_(1.0) if norm else t


def _write_loadable(tmp: dict[str, Path], preset: str, shard_mb: int, seed: int) -> None:
    """Weights of the three folders, each tensor drawn once and written to all (bf16)."""
    from transformers import LlavaForConditionalGeneration, Qwen2ForCausalLM

    from merging.writer import ShardedWriter

    text_cfg, vlm_cfg, _ = loadable_configs(preset)
    lm = _meta_entries(Qwen2ForCausalLM, text_cfg)  # model.<canonical>
    vlm = _meta_entries(LlavaForConditionalGeneration, vlm_cfg)
    lm_prefix, vlm_prefix = "model.", "model.language_model."
    canon = {k[len(lm_prefix):]: s for k, s in lm}
    vlm_lm = {k[len(vlm_prefix):]: s for k, s in vlm if k.startswith(vlm_prefix)}
    if canon != vlm_lm:  # the LLaVA's LM must be the Qwen2 LM, tensor for tensor
        raise SystemExit(f"error: LLaVA's language model differs from Qwen2's: {sorted(set(canon) ^ set(vlm_lm))[:3]}")
    bf16, limit = torch.bfloat16, shard_mb * 10**6
    writers = {"base": ShardedWriter(tmp["base"], [(k, s, bf16) for k, s in lm], limit),
               "reasoner": ShardedWriter(tmp["reasoner"], [(k, s, bf16) for k, s in lm], limit),
               "vlm": ShardedWriter(tmp["vlm"], [(k, s, bf16) for k, s in vlm], limit)}
    names = {"base": lm_prefix, "reasoner": lm_prefix, "vlm": vlm_prefix}
    gen = torch.Generator().manual_seed(seed)
    try:
        for c, shape in canon.items():  # Qwen2 has no 0-d tensors: every one has rows
            norm = c.endswith("norm.weight")
            step = max(1, CHUNK_ELEMS // math.prod(shape[1:]))
            for start in range(0, shape[0], step):
                base = _draw(shape, gen, norm, (start, min(start + step, shape[0])))
                outs = {"base": base}
                for role, std in NOISE.items():  # fine-tunes: small moves off the base
                    outs[role] = base + torch.randn(base.shape, generator=gen).mul_(std)
                for role, t in outs.items():
                    writers[role].write_rows(names[role] + c, start, t.to(bf16))
        for k, shape in vlm:  # vision tower and projector: the VLM's own
            if not k.startswith(vlm_prefix):
                writers["vlm"].write(k, _draw(shape, gen, k.endswith("norm.weight")).to(bf16))
        for w in writers.values():
            w.finish()
    finally:
        for w in writers.values():
            w.close_files()


def _save_side_files(tmp: dict[str, Path], preset: str) -> None:
    """Configs, generation configs, tokenizer (all three) and the VLM's processor + chat template."""
    from transformers import CLIPImageProcessorPil, GenerationConfig, LlavaProcessor

    from tasks import toydata as td

    text_cfg, vlm_cfg, _ = loadable_configs(preset)
    tok = build_tokenizer(text_cfg.vocab_size, text_cfg.max_position_embeddings)
    gen = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False, max_new_tokens=32)
    for role in ("base", "reasoner"):
        text_cfg.save_pretrained(tmp[role])
        gen.save_pretrained(tmp[role])
        tok.save_pretrained(tmp[role])
    v = vlm_cfg.vision_config
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": v.image_size},
                                            crop_size={"height": v.image_size, "width": v.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=v.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=td.CHAT_TEMPLATE)
    vlm_cfg.save_pretrained(tmp["vlm"])
    gen.save_pretrained(tmp["vlm"])
    processor.save_pretrained(tmp["vlm"])


def make_loadable(root: Path, preset: str = "qwen2-0.5b", shard_mb: int = 500, seed: int = 0,
                  force: bool = False) -> dict:
    """Write root/{vlm,reasoner,base} (loadable by transformers) and root/recipe_<method>.yaml.
    Returns {"paths", "seconds", "bytes", "built"}; built False when root already held this build."""
    t0 = time.time()
    root = Path(root)
    roles = ("vlm", "reasoner", "base")
    key = {"preset": preset, "seed": seed, "shard_mb": shard_mb, "noise": NOISE, "version": 1}
    paths = {r: root / r for r in roles}
    stamp = root / STAMP
    done = stamp.is_file() and json.loads(stamp.read_text()) == key
    built = force or not (done and all((p / "config.json").is_file() for p in paths.values()))
    if built:
        root.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)  # a build cut short leaves no stamp: the next call redoes it
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        try:
            tmp = {r: work / r for r in roles}
            for p in tmp.values():
                p.mkdir()
            _save_side_files(tmp, preset)
            _write_loadable(tmp, preset, shard_mb, seed)
            for r in roles:  # old folders out, new ones in (shard names may differ)
                shutil.rmtree(paths[r], ignore_errors=True)
                os.replace(tmp[r], paths[r])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for m in METHODS:
            (root / f"recipe_{m}.yaml").write_text(
                f"vlm: {paths['vlm']}\nreasoner: {paths['reasoner']}\nbase: {paths['base']}\nmethod: {m}\n")
        stamp.write_text(json.dumps(key))
    size = sum(f.stat().st_size for p in paths.values() for f in p.iterdir() if f.is_file())
    return {"paths": paths, "seconds": time.time() - t0, "bytes": size, "built": built}


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
    ml = sub.add_parser("make-loadable", help="write a triple transformers loads (vlm with processor)")
    ml.add_argument("root")
    ml.add_argument("--preset", default="qwen2-0.5b", choices=sorted(LOADABLE))
    ml.add_argument("--shard-mb", type=int, default=500)
    ml.add_argument("--seed", type=int, default=0)
    ml.add_argument("--force", action="store_true", help="rebuild even when ROOT already holds this build")
    ms = sub.add_parser("measure", help="merge a recipe; print time and peak memory as JSON")
    ms.add_argument("recipe")
    ms.add_argument("out_dir")
    ms.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        t0 = time.time()
        make_triple(Path(a.root), a.preset, a.shard_mb)
        print(f"wrote {a.root} in {time.time() - t0:.1f} s")
    elif a.cmd == "make-loadable":
        r = make_loadable(Path(a.root), a.preset, a.shard_mb, a.seed, a.force)
        what = "wrote" if r["built"] else "kept (already built; --force rebuilds)"
        size = f"{r['bytes'] / 1e9:.2f} GB" if r["bytes"] >= 10**8 else f"{r['bytes'] / 1e6:.1f} MB"
        print(f"{what} {a.root} ({a.preset}, {size}) in {r['seconds']:.1f} s")
    else:
        torch.set_grad_enabled(False)
        print(json.dumps(measure(a.recipe, a.out_dir, a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
