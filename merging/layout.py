"""Which tensors of a checkpoint are the language model, under canonical names.

Canonical names are a text LLM's names without the leading "model." (see ARCHITECTURE.md):
`layers.{i}.{rest}`, `embed_tokens.weight`, `norm.weight`, `lm_head.weight`. The mapping is
derived from the files (config model_type + tensor names), never from installed classes,
because hub checkpoints exist in both the transformers <= 4.51 and >= 4.52 layouts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from merging.errors import LabError

ROLES = ("vlm", "reasoner", "base")  # the three models of a triple
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # canonical names sized by the vocabulary

# model_type -> (family, LM prefixes to try in order, lm_head names to try). Each list covers
# both on-disk layouts: >= 4.52 / 5.x first, then <= 4.51.
_LLAVA_LIKE = (["model.language_model.", "language_model.model."], ["lm_head.weight", "language_model.lm_head.weight"])
_QWEN_VL = (["model.language_model.", "model."], ["lm_head.weight"])
_IDEFICS = (["model.text_model."], ["lm_head.weight"])
_TEXT = (["model."], ["lm_head.weight"])
FAMILIES = {
    "llava": _LLAVA_LIKE, "llava_next": _LLAVA_LIKE, "llava_onevision": _LLAVA_LIKE,
    "mistral3": _LLAVA_LIKE, "gemma3": _LLAVA_LIKE, "paligemma": _LLAVA_LIKE,
    "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL,
    "idefics2": _IDEFICS, "idefics3": _IDEFICS, "smolvlm": _IDEFICS,
}
TEXT_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "internlm2"}
# Prefixes that belong to vision / projector parts, for the unknown-family fallback.
_NON_LM = re.compile(r"vision|visual|vit\b|image|img|projector|connector|mm_|audio|perceiver|resampler", re.I)
_LAYER = re.compile(r"^(.*?)layers\.(\d+)\.(.+)$")
_LM_PARTS = ("layers.", "embed_tokens.", "norm.")


@dataclass
class Layout:
    family: str
    lm: dict[str, str]  # canonical -> actual tensor name
    other: list[str]  # never touched: vision tower, projector, anything outside the LM
    num_layers: int
    hidden_size: int | None
    vocab_size: int | None
    is_vlm: bool
    prefix: str
    warnings: list[str] = field(default_factory=list)
    context: int | None = None  # the LM's max_position_embeddings, where the config says

    def layer_names(self, layer: int) -> list[str]:
        return [c for c in self.lm if split_canonical(c)[0] == layer]


def split_canonical(name: str) -> tuple[int | None, str]:
    """("layers.3.mlp.up_proj.weight") -> (3, "mlp.up_proj.weight"); others -> (None, name)."""
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        return int(idx), rest
    return None, name


def _text_config(config: dict) -> dict:
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def derive_layout(ckpt) -> Layout:
    """The LM mapping of a Checkpoint (anything with .config, .names(), .shape(name), .path)."""
    config = ckpt.config
    names = ckpt.names()
    model_type = str(config.get("model_type", ""))
    is_vlm = any(k in config for k in ("vision_config", "visual", "vision_tower")) or model_type in FAMILIES
    warnings: list[str] = []
    if model_type in FAMILIES or (model_type in TEXT_FAMILIES and not is_vlm):
        prefixes, heads = FAMILIES.get(model_type, _TEXT)
        family = model_type
        prefix = next((p for p in prefixes if any(n.startswith(p + "layers.0.") for n in names)), None)
        if prefix is None:
            raise LabError(f"{ckpt.path}: config says {model_type[:40]!r} but no decoder layers were found under "
                           f"{' or '.join(repr(p) for p in prefixes)}")
    else:
        family = "inferred"
        prefix, heads = _infer_prefix(names, ckpt.path, model_type)
    names_set = set(names)
    lm: dict[str, str] = {}
    for n in names:
        if n.startswith(prefix):
            rest = n[len(prefix):]
            if rest.startswith(_LM_PARTS) and not _NON_LM.search(rest):
                lm[rest] = n
    head = next((h for h in heads if h in names_set), None)
    if head is not None:
        lm["lm_head.weight"] = head
    layers = {split_canonical(c)[0] for c in lm} - {None}
    if not layers:
        raise LabError(f"{ckpt.path}: no decoder layers found for model_type {model_type[:40]!r}")
    num_layers = max(layers) + 1
    if len(layers) != num_layers:
        # the first gap, found without range(num_layers): a tensor named layers.999999999 is enough
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise LabError(f"{ckpt.path}: decoder layer {gap} has no tensors (layers 0..{num_layers - 1} expected)")
    tc = _text_config(config)
    check_config_numbers(ckpt, tc, lm, num_layers)
    emb = lm.get("embed_tokens.weight")
    hidden = tc.get("hidden_size") or (ckpt.shape(emb)[1] if emb else None)
    vocab = ckpt.shape(emb)[0] if emb else tc.get("vocab_size")
    if family == "inferred":
        warnings.insert(0, f"unknown model_type {model_type!r}: inferred the language model under {prefix!r} "
                           f"({num_layers} layers, {len(lm)} tensors, lm_head {head or 'tied/absent'})")
    lm_actual = set(lm.values())
    other = [n for n in names if n not in lm_actual]
    ctx = tc.get("max_position_embeddings")
    return Layout(family, dict(sorted(lm.items(), key=lambda kv: _order(kv[0]))), other, num_layers,
                  hidden, vocab, is_vlm, prefix, warnings, ctx if isinstance(ctx, int) and ctx > 0 else None)


# Config numbers a loader builds the model from (transformers allocates what they say before
# reading any weight): a count is at most the number of tensors, a width at most the largest
# dimension of a tensor that has bytes, wherever they sit in the config (vision_config too).
# Only settings every loader builds from: CLIP's projection_dim, say, defaults to 512 unused.
_COUNTS = ("num_hidden_layers", "num_layers", "n_layers", "depth")
_WIDTHS = ("hidden_size", "intermediate_size", "embed_dim", "vocab_size", "head_dim", "num_attention_heads",
           "num_key_value_heads", "image_size", "patch_size")


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_config_numbers(ckpt, text_config: dict, lm: dict[str, str], num_layers: int) -> None:
    """config.json against the tensors present; a one-line LabError naming the setting. A config
    claiming 10**9 layers used to pass `check` and then wedge the worker that built the model."""
    cfg = ckpt.path / "config.json"
    layers = text_config.get("num_hidden_layers")
    if layers is not None and layers != num_layers:
        shown = layers if _whole(layers) else "a non-integer"
        raise LabError(f"{cfg} says num_hidden_layers {shown} but the weights have decoder layers "
                       f"0..{num_layers - 1}; refused")
    hidden = text_config.get("hidden_size")
    emb, norm = lm.get("embed_tokens.weight"), lm.get("norm.weight")
    width = ckpt.shape(emb)[-1] if emb else ckpt.shape(norm)[0] if norm and ckpt.shape(norm) else None
    if hidden is not None and width is not None and hidden != width:
        shown = hidden if _whole(hidden) else "a non-integer"
        raise LabError(f"{cfg} says hidden_size {shown} but the language model's tensors are {width} wide; refused")
    shapes = [ckpt.shape(n) for n in ckpt.names()]
    widest = max((d for s in shapes if math.prod(s) for d in s), default=0)
    for where, key, value in _numbers(ckpt.config):
        limit = len(shapes) if key in _COUNTS else widest
        if not _whole(value) or not 0 <= value <= limit:
            what = "number of tensors" if key in _COUNTS else "largest tensor dimension"
            raise LabError(f"{cfg}: {where}{key} must be a whole number from 0 to the {what} ({limit}); refused")


def _numbers(config: dict, where: str = "", depth: int = 0):
    """(path, key, value) of every count or width setting in the config tree."""
    for key, value in config.items():
        if isinstance(value, dict) and depth < 8:
            yield from _numbers(value, f"{where}{key}.", depth + 1)
        elif key in _COUNTS + _WIDTHS and value is not None:
            yield where, key, value


def _order(canonical: str):
    layer, rest = split_canonical(canonical)
    rank = {"embed_tokens.weight": -1, "norm.weight": 10**9, "lm_head.weight": 10**9 + 1}
    return (rank.get(canonical, layer if layer is not None else 10**8), rest)


def _infer_prefix(names: list[str], path, model_type: str) -> tuple[str, list[str]]:
    """Unknown family: the prefix with the most layer-indexed tensors outside vision parts."""
    counts: Counter = Counter()
    for n in names:
        m = _LAYER.match(n)
        if m and not _NON_LM.search(m.group(1)):
            counts[m.group(1)] += 1
    if not counts:
        raise LabError(f"{path}: unknown architecture {model_type!r} and no layer-indexed tensors "
                       "(…layers.N.…) to infer the language model from")
    prefix = counts.most_common(1)[0][0]
    heads = ["lm_head.weight"] + sorted(n for n in names if n.endswith("lm_head.weight") and not _NON_LM.search(n))
    return prefix, heads
