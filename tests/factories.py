"""Tiny real transformers models built offline from configs, for tests.

make_tiny_triple() gives a (vlm, reasoner, base) triple that has the same relationship as the
published ones: reasoner and the VLM's LM are both small perturbations of the base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, max_position_embeddings=128, tie_word_embeddings=False)
IMAGE_TOKEN = 95


def llama_config(num_layers: int = 2, **over):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=num_layers, **{**TEXT, **over})


def llava_config(num_layers: int = 2, **over):
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, image_size=32, patch_size=8)
    return LlavaConfig(text_config=llama_config(num_layers, **over), vision_config=vision,
                       image_token_index=IMAGE_TOKEN)


def _perturb(model, scale: float, gen: torch.Generator, skip=("embed_tokens", "lm_head")) -> None:
    """Add noise of `scale` times each tensor's mean magnitude, as a short fine-tune would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())


def make_tiny_triple(root: Path, num_layers: int = 2, seed: int = 0, layout: str = "old",
                     dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Save base/, reasoner/ (LlamaForCausalLM) and vlm/ (LlavaForConditionalGeneration) under root."""
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    root = Path(root)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    base = LlamaForCausalLM(llama_config(num_layers)).to(dtype)
    paths = {k: root / k for k in ("vlm", "reasoner", "base")}
    base.save_pretrained(paths["base"])
    reasoner = LlamaForCausalLM(llama_config(num_layers)).to(dtype)
    reasoner.load_state_dict(base.state_dict())
    _perturb(reasoner, 0.3, gen)
    reasoner.save_pretrained(paths["reasoner"])
    vlm = LlavaForConditionalGeneration(llava_config(num_layers)).to(dtype)
    vlm.model.language_model.load_state_dict(base.model.state_dict())
    vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    _perturb(vlm.model.language_model, 0.2, gen)
    vlm.save_pretrained(paths["vlm"])
    if layout == "new":
        to_new_layout(paths["vlm"])
    return paths


# transformers <= 4.51 names -> >= 4.52 / 5.x names, per family (first match wins).
NEW_LAYOUT = {
    "llava": [(r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
              (r"^vision_tower\.", "model.vision_tower."), (r"^multi_modal_projector\.", "model.multi_modal_projector.")],
    "qwen2_vl": [(r"^model\.(?!language_model\.)", "model.language_model."), (r"^visual\.", "model.visual.")],
    "idefics": [],  # Idefics2/3 keep model.text_model.* in both layouts
}


def _renamed(name: str, rules: list[tuple[str, str]]) -> str:
    for pat, rep in rules:
        if re.match(pat, name):
            return re.sub(pat, rep, name, count=1)
    return name


def rename_keys(folder: Path, rules: list[tuple[str, str]]) -> None:
    """Rewrite every safetensors file in folder with keys renamed by the first matching rule."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            meta = fh.metadata()
            tensors = {_renamed(k, rules): fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        save_file(tensors, f, metadata=meta or {"format": "pt"})
    index = Path(folder) / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_renamed(k, rules): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def to_new_layout(folder: Path, family: str = "llava") -> None:
    rename_keys(folder, NEW_LAYOUT[family])


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, by name."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (not a dict)
    return out


def reshard(folder: Path, n_shards: int = 3) -> None:
    """Split a single-file checkpoint into n shards with a model.safetensors.index.json."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    with safe_open(single, "pt") as fh:
        names = sorted(fh.keys())
        tensors = {k: fh.get_tensor(k) for k in names}
    single.unlink()
    chunks = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in chunk}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
