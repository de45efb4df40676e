"""Which LM tensors a merge changes, in which groups and dtypes: the plan merge_to_disk and the
in-place merger share (the methods never decide this).

- decoder-layer tensors, limited to `layers: [start, end]` when given;
- the final norm (and any other non-layer, non-vocabulary LM tensor) only when no `layers`
  range is given: a range means "only these layers change";
- embed_tokens / lm_head only with `embeddings: merge_shared_rows` (whatever the range, since it
  is asked for explicitly): the first min(V_v, V_r, V_0) rows are merged, the others keep the
  VLM's. A vocabulary tensor absent from the reasoner or base (tied embeddings) keeps the VLM's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.layout import VOCAB_TENSORS, split_canonical


@dataclass
class Group:
    """Canonical names merged together: one tensor (tensor scope) or one block (layer scope)."""

    layer: int | None
    names: list[str]
    shared_rows: bool = False  # merge only the first min(V_v, V_r, V_0) rows


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def plan_groups(recipe, method, layouts: dict) -> tuple[list[Group], list[str]]:
    """The merged groups in processing order, and notes for the model card."""
    v = layouts["vlm"]
    others = [layouts[r] for r in ("reasoner", "base") if r in layouts]
    notes: list[str] = []
    blocks: dict[int, list[str]] = {}
    singles: list[Group] = []
    for c in v.lm:
        layer, _ = split_canonical(c)
        if layer is not None:
            if recipe.layers is None or recipe.layers[0] <= layer <= recipe.layers[1]:
                blocks.setdefault(layer, []).append(c)
        elif c in VOCAB_TENSORS:
            if recipe.embeddings != "merge_shared_rows":
                continue
            if all(c in o.lm for o in others):
                singles.append(Group(None, [c], shared_rows=True))
            else:
                notes.append(f"{c} is absent in the reasoner or base (tied embeddings?): the VLM's is kept")
        elif recipe.layers is None:
            singles.append(Group(None, [c]))
    if method.scope == "layer":
        groups = [Group(i, names) for i, names in sorted(blocks.items())]
    else:
        groups = [Group(i, [c]) for i, names in sorted(blocks.items()) for c in names]
    return groups + singles, notes


def out_dtype_of(recipe, vlm_ck, actual: str, is_lm: bool) -> torch.dtype:
    own = vlm_ck.dtype(actual)
    if recipe.out_dtype and is_lm and own.is_floating_point:
        return torch_dtype(recipe.out_dtype)
    return own
