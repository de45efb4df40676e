"""The worker's loaded model: one VLM kept in memory and merged in place (worker side only).

`Loaded.ensure(recipe)` puts the model into the state a job asks for: the merge of that recipe,
or the original VLM (recipe None). merging.inplace.InPlaceMerger owns the weights: it re-merges
from the kept originals, so switching between recipes (several tabs, or a slider moved) is quick,
and it keeps the last merges the memory plan has room for, so the chat's original pane and the
merged pane answer one after the other without a re-merge.

Before a triple is loaded its memory plan (merging.memory_plan) is made from the checkpoints'
headers and the free memory: a triple that cannot fit is refused with one line naming what to free.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from merging.errors import LabError
from merging.inplace import InPlaceMerger
from merging.loading import load_model, serving_dtype
from merging.memory_plan import plan_triple
from merging.merge_identity import merge_key
from merging.recipe import from_dict
from webapp.protocol import Cancelled

SNAPSHOTS = 4  # merged states kept at most (the plan may allow fewer)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LabError("--device cuda was given but no CUDA device is available")
    return device


def load_serving(ref: str, device: str, trust_remote_code: bool = False, cpu_dtype: str = "float32"):
    """(model, processor) of the worker: merging.loading.load_model in the serving dtype."""
    return load_model(ref, device, dtype=serving_dtype(device, cpu_dtype), trust_remote_code=trust_remote_code)


def serving_itemsize(device: str, cpu_dtype: str = "float32") -> int | None:
    """Bytes per element of the served model's float tensors (None: the checkpoint's own)."""
    dt = serving_dtype(device, cpu_dtype)
    return None if dt == "auto" else getattr(torch, dt).itemsize


class Loaded:
    """One triple's VLM in memory plus the in-place merger, the only thing that changes its
    weights (and keeps the snapshots): this class never writes a parameter itself."""

    def __init__(self, triple: tuple[str, str, str | None], device: str, trust_remote_code: bool = False,
                 cpu_dtype: str = "float32", limit: int | None = None):
        self.triple = triple
        self.device = device
        plan = plan_triple(*triple, device, serving_itemsize(device, cpu_dtype), max_sets=SNAPSHOTS, limit=limit)
        if not plan.fits:  # before anything is loaded
            raise LabError(plan.problem)
        self.model, self.processor = load_serving(triple[0], device, trust_remote_code, cpu_dtype)
        self.merger = InPlaceMerger(self.model, *triple, device=device, snapshots=SNAPSHOTS, plan=plan)
        self.recipes: dict[str, dict] = {}  # merge key -> its recipe, to bring a merge back by key

    @property
    def current(self) -> str | None:
        """The merger's key of the live merge (None: the original VLM)."""
        return self.merger.current

    def ensure(self, recipe: dict | None, progress=None, cancel=None) -> bool:
        """Make the model hold `recipe`'s merge (None: the original). True when work was done.
        A cancelled or failed merge leaves the original VLM (the merger restores it)."""
        if recipe is None:
            if self.merger.current is None:
                return False
            self.merger.restore()
            return True
        rec = from_dict(recipe)  # the merger refuses a recipe for another triple
        key = merge_key(rec)
        self.recipes[key] = recipe
        if key == self.merger.current:
            return False
        if not self.merger.load_snapshot(key):
            self.merger.apply(rec, progress=progress, cancel=cancel)
        return True

    def hold(self, recipe: dict | None, progress=None, cancel=None) -> str:
        """ensure(recipe), then check that the merger holds exactly that state; returns its
        weights_id (what results computed on these weights are cached under)."""
        self.ensure(recipe, progress, cancel)
        want = None if recipe is None else merge_key(from_dict(recipe))
        if self.merger.current != want:
            raise LabError("internal: the model does not hold the weights this job asked for")
        return self.merger.weights_id

    @property
    def plan(self):
        return self.merger.plan

    def state(self) -> str | None:
        """What is live, to hand back to restore_state() after another job changed it."""
        return self.merger.current

    def restore_state(self, key: str | None, progress=None, cancel=None) -> None:
        """Bring back the state state() returned (a kept merge is no re-merge)."""
        if key == self.merger.current:
            return
        self.ensure(None if key is None else self.recipes[key], progress, cancel)

    def close(self) -> None:
        self.model = self.merger = self.processor = None  # the merger holds the snapshots
        gc.collect()
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


class ModelHolder:
    """At most one loaded triple at a time (the device holds one model); a new triple replaces it."""

    def __init__(self, device: str, trust_remote_code: bool = False, cpu_dtype: str = "float32",
                 limit: int | None = None):
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.cpu_dtype = cpu_dtype
        self.limit = limit  # host RAM the worker may use at most (None: whatever is free)
        self.loaded: Loaded | None = None

    def get(self, triple: tuple[str, str, str | None], progress=None) -> Loaded:
        if self.loaded is not None and self.loaded.triple == tuple(triple):
            return self.loaded
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
        if progress:
            progress(0, 1, f"loading {Path(triple[0]).name} onto {self.device}")
        self.loaded = Loaded(tuple(triple), self.device, self.trust_remote_code, self.cpu_dtype, self.limit)
        return self.loaded


__all__ = ["Cancelled", "Loaded", "ModelHolder", "load_serving", "pick_device"]
