"""Where a merge changed the model: ||W_merged - W_v||_F / ||W_v||_F per decoder layer and module.

The merged weights come from a merged folder (Checkpoint) or from a model loaded in memory
(e.g. after merging.inplace); the VLM's from its checkpoint. Both are viewed through canonical
LM names, so any on-disk layout works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from analysis.knockout import decoder_layers
from analysis.spectra import MODULES, grid
from merging.checkpoint import Checkpoint
from merging.errors import LabError
from merging.layout import derive_layout, split_canonical

NORMS = ("input_layernorm", "post_attention_layernorm")


def _module(rest: str) -> str | None:
    """'mlp.up_proj.weight' -> 'mlp.up_proj'; biases and other tensors are not mapped."""
    return rest[: -len(".weight")] if rest.endswith(".weight") else None


def checkpoint_source(ckpt) -> tuple[dict[str, str], Callable[[str], torch.Tensor], int]:
    """(canonical -> actual names, getter, num_layers) of an open Checkpoint."""
    lay = derive_layout(ckpt)
    return lay.lm, lambda c: ckpt.get(lay.lm[c]).float(), lay.num_layers


def model_source(model) -> tuple[dict[str, str], Callable[[str], torch.Tensor], int]:
    """(canonical -> parameter names, getter, num_layers) of a loaded model's decoder layers."""
    layers = decoder_layers(model)
    params = {}
    for i, block in enumerate(layers):
        for name, p in block.named_parameters():
            params[f"layers.{i}.{name}"] = p
    return ({c: c for c in params}, lambda c: params[c].detach().float().cpu(), len(layers))


def compute_changes(merged_names, merged_get, vlm_names, vlm_get, num_layers: int, progress=None) -> dict:
    """Relative change per (layer, module) over the weights both sides have.

    Returns {"num_layers", "modules", "entries": [{"layer", "module", "rel", "abs"}],
    "rel": [[per module] per layer], "max": largest relative change}.
    """
    todo = []
    for c in vlm_names:
        layer, rest = split_canonical(c)
        m = _module(rest)
        if layer is not None and m is not None and c in merged_names:
            todo.append((layer, m, c))
    if not todo:
        raise LabError("the merged model and the VLM share no decoder-layer weights")
    entries = []
    for i, (layer, m, c) in enumerate(todo):
        if progress:
            progress(i, len(todo), f"changes: layer {layer} {m}")
        w_v, w_m = vlm_get(c), merged_get(c)
        if w_v.shape != w_m.shape:
            raise LabError(f"{c}: merged {tuple(w_m.shape)} vs VLM {tuple(w_v.shape)}")
        diff = float((w_m - w_v).norm())
        ref = float(w_v.norm())
        entries.append({"layer": layer, "module": m, "abs": diff, "rel": diff / ref if ref > 0 else 0.0})
    if progress:
        progress(len(todo), len(todo), "changes: done")
    present = {e["module"] for e in entries}
    modules = [m for m in MODULES + NORMS if m in present] + sorted(present - set(MODULES) - set(NORMS))
    return {"num_layers": num_layers, "modules": modules, "entries": entries,
            "rel": grid(entries, "rel", num_layers, modules), "max": max(e["rel"] for e in entries)}


def change_map(merged, vlm, progress=None) -> dict:
    """merged: a folder / hub id of a merged model, or a loaded model; vlm: the VLM's folder / id."""
    with Checkpoint.open(vlm) as vck:
        v_names, v_get, n = checkpoint_source(vck)
        if isinstance(merged, torch.nn.Module):
            m_names, m_get, nm = model_source(merged)
            return _checked(m_names, m_get, nm, v_names, v_get, n, progress)
        with Checkpoint.open(merged) as mck:
            m_names, m_get, nm = checkpoint_source(mck)
            return _checked(m_names, m_get, nm, v_names, v_get, n, progress)


def _checked(m_names, m_get, nm, v_names, v_get, n, progress):
    if nm != n:
        raise LabError(f"the merged model has {nm} decoder layers, the VLM {n}")
    return compute_changes(m_names, m_get, v_names, v_get, n, progress)
