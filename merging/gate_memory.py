"""What FRISM's gate learning holds on its device, computed from the checkpoint headers before anything
loads (a gate_learning.Setup `s` names the triple, the gated matrices and the device), and the dtype it
learns in."""

from __future__ import annotations

import math

import torch

from merging.checkpoint import Checkpoint
from merging.errors import LabError
from merging.layout import split_canonical
from merging.memory_plan import free_memory


def learning_dtype(device: str) -> str:
    """**[choice]** float32 on a CPU (the toy family learns in minutes there); on a GPU the checkpoint's own
    dtype (bfloat16 for the public 7B pairs), VLM and task vectors alike, halving what learning holds; the
    gates themselves, Adam's state and the KL stay float32, and the merge still uses the exact tau_r."""
    return "float32" if torch.device(device).type == "cpu" else "auto"


def gated_matrices(vlm_ref: str, lm: dict, canonicals) -> list[str]:
    """The matrices frism gates among CANONICALS: every 2-D tensor of a decoder layer (LM maps canonical
    names to the VLM checkpoint's)."""
    with Checkpoint.open(vlm_ref) as ck:
        return [c for c in canonicals if split_canonical(c)[0] is not None and len(ck.shape(lm[c])) == 2]


def learning_bytes(s) -> int:
    """What learning holds on its device besides one prompt's activations (holding_bytes of s)."""
    return holding_bytes(s.refs["vlm"], s.layouts["vlm"].lm, s.names, s.device)


def holding_bytes(vlm_ref: str, lm: dict, names: list[str], device: str) -> int:
    """Its own copy of the VLM, and for each gated matrix (canonical NAMES; LM maps them to the
    checkpoint's names) its task vector and the gated weight W_v + delta(g) the forward uses, in the
    learning dtype on DEVICE."""
    with Checkpoint.open(vlm_ref) as ck:
        def size(name: str) -> int:
            return 4 if learning_dtype(device) == "float32" else ck.dtype(name).itemsize

        vlm = sum(math.prod(ck.shape(n)) * size(n) for n in ck.names())
        gated = sum(math.prod(ck.shape(lm[c])) * size(lm[c]) for c in names)
    return vlm + 2 * gated


def check_room(s) -> None:
    """LabError before anything loads when learning would not fit the device's free memory (a 7B pair
    in bfloat16 holds about 40 GiB for every layer's gates: a 24 GB card learns part of the layers)."""
    need = learning_bytes(s)
    free, _ = free_memory(s.device)
    if need > 0.9 * free:
        raise LabError(f"frism: learning the gates of {len(s.names)} matrices holds about {need / 2**30:.1f} GiB "
                       f"on {s.device} (its own copy of the VLM, the task vectors and the gated weights), "
                       f"{free / 2**30:.1f} GiB is free: merge fewer layers ('layers: [a, b]'), free the device, or set 'steps: 0'")
