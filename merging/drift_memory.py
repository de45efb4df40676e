"""What a DRIFT fine-tune holds, from the checkpoints' headers, and its one-line refusal before anything
loads when that cannot fit (the fine-tune: merging/finetune.py; the prior and its hooks: merging/drift.py).

The fine-tune trains in float32 whatever the checkpoint's dtype (AdamW's steps at the usual learning
rates are below bfloat16's resolution), so it holds: the whole VLM in float32; for every language-model
tensor (all of them train; the vision tower and projector stay frozen) its gradient and AdamW's two
moments, float32; and the prior D = W_r - W_v, float32, for every attention/MLP projection, once on
the host where it is computed and, on a GPU, once more on the card beside the hooks. Activations come
on top. For the Qwen2-VL-7B shape that is about 140 GiB on the card (30.9 + 85.1 + 24.3): more than an
80 GB card, and all of a 141 GB one before activations. The recipe's `layers: [a, b]` trains those
decoder layers only, with gradients, moments and prior for them alone: 8 of the 28 layers hold
30.9 + 20.8 + 6.9 = 58.7 GiB, which an 80 GB card holds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.drift import PRIOR_NAMES, in_layers
from merging.errors import LabError
from merging.memory_plan import free_memory

GiB = 2**30
HEADROOM = 0.9  # **[choice]** the share of free memory counted on: activations and the allocator take the rest


@dataclass(frozen=True)
class DriftBytes:
    model: int  # the VLM in float32
    training: int  # gradients and AdamW's two moments of the language model, float32
    prior: int  # D for each attention/MLP projection, float32

    def on(self, device: str) -> tuple[int, int]:
        """(bytes on the device, bytes on the host); on a CPU both are the host's, the prior counted once."""
        total = self.model + self.training + self.prior
        return (total, total) if torch.device(device).type == "cpu" else (total, self.prior)


def drift_bytes(vlm_ref: str, reasoner_ref: str, layers: list[int] | None = None) -> DriftBytes:
    """What the fine-tune holds; with LAYERS [a, b] only those decoder layers train and have a prior."""
    report = check_triple(vlm_ref, reasoner_ref)
    lv = report.layouts["vlm"]
    with Checkpoint.open(vlm_ref) as ck:
        size = {name: math.prod(ck.shape(name)) for name in ck.names()}
    count = lv.num_layers
    if layers is not None and layers[1] >= count:  # as trainable_parameters says it, before anything loads
        raise LabError(f"drift layers {layers} is out of range: the model has {count} decoder layers (0 to {count - 1})")
    lm = {lv.lm[c] for c in lv.lm if in_layers(c, layers)}  # a tied head maps to the embedding: counted once
    prior = {lv.lm[c] for c in lv.lm if PRIOR_NAMES.match(c) and in_layers(c, layers)}
    return DriftBytes(4 * sum(size.values()), 12 * sum(size[n] for n in lm), 4 * sum(size[n] for n in prior))


def refusal(b: DriftBytes, device: str, free_device: int, free_host: int, label: str) -> str | None:
    """The one-line reason the fine-tune cannot fit, or None."""
    on_device, on_host = b.on(device)
    parts = (f"the VLM in float32 {b.model / GiB:.1f}, the language model's gradients and AdamW moments "
             f"{b.training / GiB:.1f}, the prior {b.prior / GiB:.1f}")
    if on_device > HEADROOM * free_device:
        where = "memory, use a machine with more" if torch.device(device).type == "cpu" else "the device, use a larger card"
        return (f"DRIFT: fine-tuning {label} holds about {on_device / GiB:.1f} GiB on {device} ({parts}) and "
                f"{free_device / GiB:.1f} GiB is free: free {where} or a smaller VLM, train fewer layers ('layers: "
                "[a, b]' in the drift section), or merge instead (a merge holds no gradients)")
    if torch.device(device).type != "cpu" and on_host > HEADROOM * free_host:
        return (f"DRIFT: the prior of {label} takes {on_host / GiB:.1f} GiB of host RAM while it is computed and "
                f"{free_host / GiB:.1f} GiB is available: free host memory")
    return None


def check_room(vlm_ref: str, reasoner_ref: str, device: str, layers: list[int] | None = None) -> None:
    """LabError before anything loads when the fine-tune would not fit this machine right now."""
    msg = refusal(drift_bytes(vlm_ref, reasoner_ref, layers), device, *free_memory(device),
                  label=os.path.basename(os.path.normpath(str(vlm_ref))))
    if msg:
        raise LabError(msg)
