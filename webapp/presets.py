"""Model triples the app offers (the bundled toy family + the public triples of the papers) and custom-triple checks.

Nothing here loads weights: it only says where a triple's models are and whether they are on
this machine (local folders, or the local Hugging Face cache; the lab never downloads).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from merging.errors import LabError
from merging.hub import looks_like_hub_id, resolve_hub_id, shown

REPO_ROOT = Path(__file__).resolve().parent.parent
# MERGE_LAB_TOY_DIR: another toy family folder (e.g. one made by tools/make_toy_family.py --smoke).
TOY_ROOT = Path(os.environ.get("MERGE_LAB_TOY_DIR") or REPO_ROOT / "assets" / "toy").resolve()
CUSTOM = "Custom triple (folders or hub ids)"


@dataclass(frozen=True)
class Preset:
    label: str
    vlm: str
    reasoner: str
    base: str
    note: str = ""

    def triple(self) -> dict[str, str]:
        return {"vlm": self.vlm, "reasoner": self.reasoner, "base": self.base}


def _toy() -> Preset:
    return Preset("Toy family (bundled, CPU, seconds)", str(TOY_ROOT / "vlm"), str(TOY_ROOT / "math"),
                  str(TOY_ROOT / "base"), "tiny LLaVA + math LLM + their shared base, trained from scratch")


PRESETS: list[Preset] = [
    _toy(),
    Preset("LLaVA-NeXT-8B + Dart-Math prop2diff (BR2V)", "llava-hf/llama3-llava-next-8b-hf",
           "hkust-nlp/dart-math-llama3-8b-prop2diff", "meta-llama/Meta-Llama-3-8B", "MathVista 38.2 -> 41.8 (BR2V)"),
    Preset("LLaVA-NeXT-8B + Dart-Math uniform", "llava-hf/llama3-llava-next-8b-hf",
           "hkust-nlp/dart-math-llama3-8b-uniform", "meta-llama/Meta-Llama-3-8B", "37.4 -> 38.2 (DRIFT's table)"),
    Preset("LLaVA-NeXT-8B + MAmmoTH2-8B", "llava-hf/llama3-llava-next-8b-hf", "TIGER-Lab/MAmmoTH2-8B",
           "meta-llama/Meta-Llama-3-8B"),
    Preset("Idefics2-8B + MetaMath-Mistral-7B", "HuggingFaceM4/idefics2-8b", "meta-math/MetaMath-Mistral-7B",
           "mistralai/Mistral-7B-v0.1"),
    Preset("Idefics3-8B + DeepSeek-R1-Distill-Llama-8B", "HuggingFaceM4/Idefics3-8B-Llama3",
           "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "meta-llama/Llama-3.1-8B"),
    Preset("Qwen2-VL-7B + Qwen2-Math-7B", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-Math-7B", "Qwen/Qwen2-7B"),
    Preset("Qwen2.5-VL-7B + Qwen2.5-Math-7B", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-Math-7B",
           "Qwen/Qwen2.5-7B"),
    Preset("Qwen2.5-VL-7B + R1-Distill-Qwen-7B (merges degrade)", "Qwen/Qwen2.5-VL-7B-Instruct",
           "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen/Qwen2.5-7B",
           "the reasoner's parent is Qwen2.5-Math-7B, not the base: expect a loss (67.9 -> 65.8)"),
    Preset("InternVL2.5-38B + QwQ-32B", "OpenGVLab/InternVL2_5-38B", "Qwen/QwQ-32B", "Qwen/Qwen2.5-32B"),
]
DEFAULT = PRESETS[0].label


def labels() -> list[str]:
    return [p.label for p in PRESETS] + [CUSTOM]


def by_label(label: str) -> Preset:
    for p in PRESETS:
        if p.label == label:
            return p
    raise LabError(f"unknown preset {label!r}")


def locate(ref: str) -> str:
    """A preset's model as a folder: its own path, or (a hub id) its snapshot in the local Hugging Face
    cache, never a folder of the working directory that happens to share the id's name."""
    p = Path(ref)
    if p.is_absolute() or not looks_like_hub_id(ref):
        if not (p / "config.json").is_file():
            raise LabError(f"missing: {shown(ref)} is not a model folder")
        return ref
    try:
        return str(resolve_hub_id(ref))
    except LabError:
        raise LabError(f"not downloaded: {shown(ref)} is not in the local Hugging Face cache") from None


def availability(ref: str) -> str | None:
    """None when ref is on this machine, else a plain sentence saying why not."""
    try:
        locate(ref)
    except LabError as e:
        return str(e)
    return None


def missing_parts(triple: dict[str, str]) -> list[str]:
    return [msg for ref in triple.values() if ref and (msg := availability(ref))]


def resolve_custom(ref: str, models_root: str | None) -> str:
    """A user-typed model reference, checked against --models-root when one is set.

    Without a root: any local folder or hub id (hub ids resolve through the local cache only).
    With a root: a folder name relative to the root (no "..", no absolute paths, no symlink that
    leads outside the root), or a hub id that is not a folder under the root, returned as its snapshot
    folder in the local Hugging Face cache (so nothing downstream looks it up relative to the working
    directory).
    """
    ref = (ref or "").strip()
    if not ref:
        raise LabError("all three models are needed: VLM, reasoner and base")
    if models_root is None:
        return str(Path(ref).expanduser()) if Path(ref).expanduser().exists() else ref
    root = Path(models_root).expanduser().resolve()
    rel = Path(ref)
    if ".." in rel.parts:
        raise LabError(f"{shown(ref)!r}: '..' is not allowed; give a folder inside the models root {root}")
    if rel.is_absolute():
        try:
            rel = rel.relative_to(root)
        except ValueError:
            raise LabError(f"{shown(ref)!r} is outside the models root {root}; give a folder name inside it") from None
    candidate = root / rel
    if os.path.lexists(candidate):
        real = candidate.resolve()
        if real != root and root not in real.parents:
            raise LabError(f"{ref!r} is a link that leads outside the models root {root}; refused")
        return str(real)
    if looks_like_hub_id(ref):  # through the Hugging Face cache only, never relative to the working directory
        try:
            return str(resolve_hub_id(ref))
        except LabError:
            raise LabError(f"{ref!r} is not a folder inside the models root {root} and not in the local "
                           "Hugging Face cache") from None
    raise LabError(f"{ref!r} is not a folder inside the models root {root}")
