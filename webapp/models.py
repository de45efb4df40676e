"""The worker's loaded model: one VLM kept in memory and merged in place (worker side only).

`Loaded.ensure(recipe)` puts the model into the state a job asks for: the merge of that recipe,
or the original VLM (recipe None). Re-merging is done by merging.inplace.InPlaceMerger from the
kept originals, so switching between recipes (several tabs, or a slider moved) is quick; for
small models the merged tensors of the last few recipes are also kept, so switching back is a copy.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from pathlib import Path

from merging.errors import LabError
from webapp.jobs import Cancelled, recipe_key

SNAPSHOT_MAX_BYTES = 256 * 2**20  # keep merged-state snapshots only for LMs below this size
SNAPSHOTS = 4


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LabError("--device cuda was given but no CUDA device is available")
    return device


def load_vlm(ref: str, device: str, trust_remote_code: bool = False):
    """(model, processor) for a folder or cached hub id. A model's own Python code (config
    `auto_map`) runs only when the operator started the app with --trust-remote-code."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from merging.hub import resolve

    path = resolve(ref)
    trust = bool(trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise LabError(f"{ref} needs its own Python code to load (auto_map in config.json); the lab runs "
                       "such code only when started with --trust-remote-code") from None
    dtype = torch.float32 if device == "cpu" else "auto"
    vision = hasattr(config, "vision_config")
    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust).to(device).eval()
    try:
        proc = (AutoProcessor if vision else AutoTokenizer).from_pretrained(path, trust_remote_code=trust)
    except Exception as e:
        raise LabError(f"{ref} has no usable tokenizer/processor ({type(e).__name__}); the model cannot chat") from None
    return model, proc


class Loaded:
    """One triple's VLM in memory plus the in-place merger; `current` is the state's recipe key."""

    def __init__(self, triple: tuple[str, str, str | None], device: str, trust_remote_code: bool = False):
        from merging.inplace import InPlaceMerger

        self.triple = triple
        self.device = device
        self.model, self.processor = load_vlm(triple[0], device, trust_remote_code)
        self.merger = InPlaceMerger(self.model, *triple, device=device)
        self.current: str | None = None
        self._snapshots: OrderedDict[str, dict] = OrderedDict()
        self._params = None

    def _lm_params(self) -> dict:
        if self._params is None:
            self._params = dict(self.model.named_parameters())
        return self._params

    def _lm_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._lm_params().values())

    def ensure(self, recipe: dict | None, progress=None, cancel=None) -> bool:
        """Make the model hold `recipe`'s merge (None: the original). True when work was done."""
        key = recipe_key(recipe)
        if key == self.current:
            return False
        try:
            if key is None:
                self.merger.restore()
            elif key in self._snapshots:
                self._load_snapshot(key)
            else:
                from merging.recipe import from_dict

                self.merger.apply(from_dict(recipe), progress=progress, cancel=cancel)
                self._take_snapshot(key)
        except BaseException:
            # A cancelled or failed merge leaves a half-merged model: go back to the original.
            self.merger.restore()
            self.current = None
            raise
        self.current = key
        return True

    def _take_snapshot(self, key: str) -> None:
        if self._lm_bytes() > SNAPSHOT_MAX_BYTES:
            return
        self._snapshots[key] = {n: p.detach().clone() for n, p in self._lm_params().items()}
        while len(self._snapshots) > SNAPSHOTS:
            self._snapshots.popitem(last=False)

    def _load_snapshot(self, key: str) -> None:
        import torch

        snap = self._snapshots[key]
        self._snapshots.move_to_end(key)
        with torch.no_grad():
            for n, p in self._lm_params().items():
                p.copy_(snap[n])

    def close(self) -> None:
        self.model = self.merger = self.processor = None
        self._snapshots.clear()
        self._params = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


class ModelHolder:
    """At most one loaded triple at a time (the device holds one model); a new triple replaces it."""

    def __init__(self, device: str, trust_remote_code: bool = False):
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.loaded: Loaded | None = None

    def get(self, triple: tuple[str, str, str | None], progress=None) -> Loaded:
        if self.loaded is not None and self.loaded.triple == tuple(triple):
            return self.loaded
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
        if progress:
            progress(0, 1, f"loading {Path(triple[0]).name} onto {self.device}")
        self.loaded = Loaded(tuple(triple), self.device, self.trust_remote_code)
        return self.loaded


__all__ = ["Cancelled", "Loaded", "ModelHolder", "load_vlm", "pick_device"]
