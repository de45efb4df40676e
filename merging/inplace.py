"""Merge into a VLM already loaded in memory (the app's sliders), without writing a folder.

InPlaceMerger places what a merge needs by a merging.memory_plan.MemoryPlan, per decoder layer:
- pointer layers (the device has room): a merge binds new tensors to the parameters (those of
  the merge it drops, when there is one: no new allocation) and the loaded ones stay untouched as
  the originals, so restore() and a switch back to a kept merge are pointer exchanges, no copy;
- in-place layers: a merge is written over the loaded tensors after their originals were copied
  to host RAM in the checkpoint's dtype (exact), or, without room, they are re-read from the
  VLM's files; a kept merge waits in host RAM, in its output dtype (exact too);
- the reasoner's and base's tensors sit on the device, in host RAM, or are read from the files
  at each merge; on a CPU an elementwise method streams them by row blocks on all of torch's
  threads (merging.inplace_stream).
apply(recipe) always merges from the originals, never from the previous merge, with the same plan
and merge code as the streaming engine, so a merge in place equals the folder written by
`python -m merging merge` tensor for tensor.

The merger is the one owner of the model's LM weights: callers change them only through apply(),
load_snapshot() and restore(), and read what is live from `current` / `weights_id`. Kept merges
("snapshots") live inside it, so restore() always knows which tensors differ from the VLM's.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from merging import memory_plan, merge_report, methods, params
from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.device import BLOCK_ELEMS, check_device, one_thread
from merging.errors import LabError
from merging.hub import resolve
from merging.inplace_stream import RowStreamer, Spares, StreamMemo
from merging.layout import ROLES, VOCAB_TENSORS, split_canonical
from merging.merge_identity import merge_key, triple_fingerprints, weights_id
from merging.merge_plan import plan_groups, torch_dtype
from merging.methods import Diagnostics, MergeContext, TensorSet
from merging.param_map import map_parameters  # also imported from here (drift, gate_learning)
from merging.tensor_merge import Progress, merge_group, read_checked

# `current` while the weights are being changed, or after a change was interrupted: matches no
# key and is not None, so every caller's next step re-establishes a known state.
PARTIAL = "(partial)"


def _unit(c: str) -> int:
    layer, _ = split_canonical(c)
    return layer if layer is not None else (-2 if c in VOCAB_TENSORS else -1)


class InPlaceMerger:
    """merger = InPlaceMerger(model, vlm_ref, reasoner_ref, base_ref, device); merger.apply(recipe);
    merger.restore(). `model` is the VLM loaded from vlm_ref (any device, usually its own dtype).

    snapshots: how many merged states to keep (the live one included), so switching back, or
    answering the original pane and then the merge again, is no re-merge; the plan may allow fewer.
    plan: a MemoryPlan (default: planned now from the free memory, the model already loaded)."""

    def __init__(self, model, vlm_ref: str, reasoner_ref: str, base_ref: str | None = None,
                 device: str | None = None, snapshots: int = 0, plan: memory_plan.MemoryPlan | None = None,
                 hold_inputs_below: int = memory_plan.EXTRA_SET_MAX_BYTES):
        self.model = model
        self.refs = {"vlm": vlm_ref, "reasoner": reasoner_ref, **({"base": base_ref} if base_ref else {})}
        report = check_triple(vlm_ref, reasoner_ref, base_ref)
        report.raise_if_incompatible()
        self.layouts = report.layouts
        self.num_layers = self.layouts["vlm"].num_layers
        first = next(model.parameters())
        self.device = str(device or first.device)
        check_device(self.device)
        with Checkpoint.open(vlm_ref) as ck:
            vl = self.layouts["vlm"]
            shapes = {c: ck.shape(a) for c, a in vl.lm.items()}
            self.vlm_dtypes = {c: ck.dtype(a) for c, a in vl.lm.items()}
        names = map_parameters(model, shapes)
        named = dict(model.named_parameters(remove_duplicate=False))
        self.params = {c: named[n] for c, n in names.items()}
        if plan is None:
            itemsize = first.element_size() if first.is_floating_point() else None
            plan = memory_plan.plan_triple(vlm_ref, reasoner_ref, base_ref, self.device, itemsize, loaded=True,
                                           max_sets=max(snapshots, 1), hold_inputs_below=hold_inputs_below)
        if not plan.fits:
            raise LabError(plan.problem)
        self.plan = plan
        self._place = {c: plan.of(_unit(c)) for c in self.params}
        self.max_snapshots = min(snapshots, plan.sets)
        self.host = "cpu"
        # Pointer units: the loaded tensors themselves (never written while they are the originals).
        # In-place units: a host copy in the checkpoint's dtype, or nothing (re-read from the files).
        self.original: dict[str, torch.Tensor] = {}
        for c, p in self.params.items():
            where = self._place[c]
            if where.merged == "device":
                self.original[c] = p.detach()
            elif where.original == "host":
                self.original[c] = self._to_host(p.detach(), self.vlm_dtypes[c])
        self._check_file_originals()
        # key -> (the merge's tensors in their kept form, its diagnostics, its out_dtype); oldest first. The
        # live merge is not in it: its tensors are the parameters'.
        self._snapshots: OrderedDict[str, tuple[dict[str, torch.Tensor], Diagnostics, torch.dtype | None]] = OrderedDict()
        self._current: str | None = None
        self._diagnostics = Diagnostics()  # diagnostics and merge report of the live merge
        self._out_dtype: torch.dtype | None = None  # the live merge's out_dtype (None: the VLM's own)
        self._fingerprints: dict[str, str] | None = None
        self.cache: dict[tuple[str, str], torch.Tensor] = {}  # resident reasoner/base tensors
        self._load([c for c in self.params if _unit(c) != -2])  # vocabulary tensors on demand
        self.dirty: set[str] = set()
        self._vlm_ck = None  # the VLM checkpoint, open during apply()
        self._memo = StreamMemo()  # what streamed merges learnt of the originals (merging.inplace_stream)
        self.block_elems = BLOCK_ELEMS  # elements per streamed block
        self._spare = Spares()  # during apply(): the dropped merge's tensors, for the new one to write into

    @classmethod
    def from_recipe(cls, model, recipe, device: str | None = None) -> InPlaceMerger:
        """The merger for a recipe's triple (the base is read only when the recipe names one)."""
        return cls(model, recipe.vlm, recipe.reasoner, recipe.base, device)

    def _to_host(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = t.to(device=self.host, dtype=dtype, copy=True)
        if torch.device(self.device).type == "cuda":
            out = out.pin_memory()  # host <-> device copies at full speed
        return out

    def _check_file_originals(self) -> None:
        """Originals re-read from the files must be what was loaded: one tensor per unit is compared
        (a model class that changes weights while loading would make such a restore inexact)."""
        seen = set()
        todo = [c for c in self.params if self._place[c].original == "file" and _unit(c) not in seen
                and not seen.add(_unit(c))]
        if not todo:
            return
        with Checkpoint.open(self.refs["vlm"]) as ck:
            for c in todo:
                t = ck.get(self.layouts["vlm"].lm[c])
                if not torch.equal(t.to(device=self.device, dtype=self.params[c].dtype), self.params[c].detach()):
                    raise LabError(f"the loaded model's {c} differs from its checkpoint, and there is no room to keep "
                                   "a copy of the originals: free host RAM")

    def _load(self, canonicals: list[str]) -> None:
        for role in ("reasoner", "base"):
            if role not in self.refs:
                continue
            todo = [c for c in canonicals if (role, c) not in self.cache and c in self.layouts[role].lm
                    and self._place[c].inputs != "file"]
            if not todo:
                continue
            with Checkpoint.open(self.refs[role]) as ck:
                for c in todo:
                    if self._place[c].inputs == "device":
                        t = read_checked(ck, self.layouts[role].lm[c], role, self.device)
                    else:
                        t = self._to_host(read_checked(ck, self.layouts[role].lm[c], role, "cpu"), ck.dtype(
                            self.layouts[role].lm[c]))
                    self.cache[(role, c)] = t

    def _input(self, cks: dict, role: str, c: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The VLM's original (the live parameter: merges start from a restored model), or the
        reasoner's / base's tensor, on the device in the compute dtype."""
        if role == "vlm":
            return self.params[c].detach().to(dtype=dtype)
        if role not in self.refs:
            return None
        t = self.cache.get((role, c))
        if t is None:
            t = read_checked(cks[role], self.layouts[role].lm[c], role, "cpu")
        return t.to(device=self.device, dtype=dtype, non_blocking=True)

    # -- what is live ----------------------------------------------------------------------------
    @property
    def current(self) -> str | None:
        """merge_key() of the merge the model holds now; None when it holds the VLM's own weights;
        PARTIAL while (or after being interrupted while) changing them."""
        return self._current

    @property
    def fingerprints(self) -> dict[str, str]:
        """The triple's checkpoint fingerprints (computed once, on first use)."""
        if self._fingerprints is None:
            self._fingerprints = triple_fingerprints(*(self.refs.get(r) for r in ROLES))
        return self._fingerprints

    @property
    def weights_id(self) -> str:
        """weights_id() of the live weights: what an analysis of this model must be cached under."""
        return weights_id(self.fingerprints, self._current)

    def snapshots(self) -> list[str]:
        """Keys of the merges that can be had without re-merging, least recently used first (the
        live one last)."""
        live = [self._current] if self.max_snapshots and self._current not in (None, PARTIAL) else []
        return list(self._snapshots) + live

    # -- changing the weights -------------------------------------------------------------------
    def _check_triple(self, recipe) -> None:
        for role in ROLES:
            ref = getattr(recipe, role)
            if role == "base" and not ref:
                continue  # a method without a base never reads it
            if role not in self.refs or os.path.realpath(resolve(ref)) != os.path.realpath(resolve(self.refs[role])):
                raise LabError(f"this merger holds {self.refs.get(role)} as the {role}; the recipe names {ref}")

    def _open_inputs(self, names) -> dict:
        """Checkpoints of the roles whose tensors a merge of `names` reads from the files."""
        roles = {r for r in ("reasoner", "base") if r in self.refs
                 for c in names if (r, c) not in self.cache and c in self.layouts[r].lm}
        return {r: Checkpoint.open(self.refs[r]) for r in roles}

    def _bind(self, c: str, value: torch.Tensor) -> None:
        """Make parameter c hold `value` (the merge's result): pointer units get a tensor of their
        own (the loaded one stays the original), in-place units are written over."""
        p = self.params[c]
        self.dirty.add(c)  # before the change: an interrupt between the two must not hide it
        if self._place[c].merged == "device":
            fresh = self._spare.take(c, p)
            fresh.copy_(value)
            p.data = fresh
        else:
            p.copy_(value)

    @torch.no_grad()
    def apply(self, recipe, progress=None, cancel=None) -> dict:
        """Merge `recipe` (its method, knobs, layers, embeddings, dtypes, seed; its triple must be
        the one given at construction) into the model. Returns the method's diagnostics
        and the merge report (Diagnostics.as_dict()). On an error or cancel the model is restored to the VLM's weights."""
        method = methods.get(recipe.method)
        if method.needs_base and "base" not in self.refs:
            raise LabError(f"method {method.name!r} needs a base model; this merger was built without one")
        self._check_triple(recipe)
        params.validate_lengths(recipe, self.num_layers)
        groups, _ = plan_groups(recipe, method, self.layouts)
        names = [c for g in groups for c in g.names]
        cdtype = torch_dtype(recipe.dtype)
        knobs = recipe.knobs()
        # the fingerprints let ip_merging file its decompositions for the analyses
        ctx = MergeContext(seed=recipe.seed, device=self.device, num_layers=self.num_layers,
                           fingerprints=self.fingerprints, release=self._release)
        bar = Progress(len(names), progress, cancel, bar=False)
        cks = {}
        self._vlm_ck = None  # the VLM's rows, opened by the first streamed merge (inputs held: none)
        streamer = RowStreamer(torch.get_num_threads(), self._memo, self.block_elems)
        try:
            self._restore(recycle=True)
            self._make_room()
            self._current = PARTIAL
            method.prepare(recipe, ctx, progress, cancel)
            self._load(names)  # after prepare: a learning method may have had _release let go of them
            cks = self._open_inputs(names)
            for g in groups:
                bar.check()
                if self._streams(method, g, cks):
                    with one_thread(torch.device(self.device).type == "cpu"):
                        self._merge_streamed(streamer, method, g, cks, knobs, ctx, cdtype, recipe)
                else:
                    sets = {c: TensorSet(c, g.layer, *(self._input(cks, r, c, cdtype) for r in ROLES))
                            for c in g.names}
                    out = merge_group(method, g, sets, knobs, ctx)
                    for c, res in out.items():
                        dtype = torch_dtype(recipe.out_dtype) if recipe.out_dtype else self.vlm_dtypes[c]
                        self._bind(c, res.to(dtype))
                    del sets, out
                bar.step(len(g.names), f"layer {g.layer}" if g.layer is not None else g.names[0])
        except BaseException:
            self.restore()
            raise
        finally:
            self._spare.clear()  # what the new merge did not reuse goes back to the system
            streamer.close()
            for ck in (*cks.values(), *([self._vlm_ck] if self._vlm_ck is not None else [])):
                ck.close()
            self._vlm_ck = None
        self._current = merge_key(recipe)
        ctx.diagnostics.report = merge_report.build(method.name, ctx.diagnostics, names, recipe.knobs())
        self._diagnostics = ctx.diagnostics
        self._out_dtype = torch_dtype(recipe.out_dtype) if recipe.out_dtype else None
        return ctx.diagnostics.as_dict()

    def _release(self) -> None:
        """Let go of what can be read again from the files: the reasoner's and base's tensors kept per the
        plan, and spare buffers (a method's own learning needs the memory; _load brings the inputs back)."""
        self.cache.clear()
        self._spare.clear()
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

    def _make_room(self) -> None:
        """Drop the oldest kept merges until the new one fits the plan's count; their tensors become
        the new merge's spares."""
        while self._snapshots and len(self._snapshots) >= max(self.max_snapshots, 1):
            tensors, _, _ = self._snapshots.popitem(last=False)[1]
            for c, t in tensors.items():
                self._add_spare(c, t)

    def _add_spare(self, c: str, t: torch.Tensor) -> None:
        if self._place[c].merged == "device":  # in-place units' kept merges are host copies, not spares
            self._spare.add(c, t, self.params[c], self.original[c])

    def _streams(self, method, g, cks: dict) -> bool:
        """An elementwise method on one tensor whose inputs come from the files streams through the
        engine's row blocks (each block's passes stay in cache: on a CPU several times faster than
        whole-tensor passes), exactly as `python -m merging merge` does."""
        c = g.names[0]
        return (method.elementwise and len(g.names) == 1 and self.params[c].dim() > 0
                and all((r, c) not in self.cache for r in ("reasoner", "base") if r in self.refs)
                and torch.device(self.device).type == "cpu")

    def _merge_streamed(self, streamer: RowStreamer, method, g, cks: dict, knobs: dict, ctx, cdtype, recipe) -> None:
        c = g.names[0]
        p = self.params[c]
        dtype = torch_dtype(recipe.out_dtype) if recipe.out_dtype else self.vlm_dtypes[c]
        pointer = self._place[c].merged == "device"
        target = self._spare.take(c, p) if pointer else p.detach()
        if not pointer:
            self.dirty.add(c)  # written row block by row block from here on
        if self._vlm_ck is None:
            self._vlm_ck = Checkpoint.open(self.refs["vlm"])
        files = {**cks, "vlm": self._vlm_ck}
        files.update({r: Checkpoint.open(self.refs[r]) for r in ("reasoner", "base")
                      if r in self.refs and r not in files})
        try:
            streamer.merge(method, g, files, self.layouts, knobs, ctx, cdtype, target, dtype, self.original.get(c))
        finally:
            for r, ck in files.items():
                if r != "vlm" and r not in cks:
                    ck.close()
        if pointer:
            self.dirty.add(c)
            p.data = target

    @torch.no_grad()
    def load_snapshot(self, key: str) -> bool:
        """Make the model hold the kept merge `key` (no re-merge). False when not kept."""
        if key not in self.snapshots():
            return False
        if key == self._current:
            return True
        # taken out before restore() keeps the live merge: were the merger full, keeping that one would
        # drop the oldest kept merge, which may be this one
        tensors, diag, out_dtype = self._snapshots.pop(key)
        try:
            self.restore()
            self._current = PARTIAL
            for c, t in tensors.items():
                self.dirty.add(c)
                if self._place[c].merged == "device":
                    self.params[c].data = t
                else:
                    self.params[c].copy_(t)
        except BaseException:
            self.restore()
            raise
        self._current, self._diagnostics, self._out_dtype = key, diag, out_dtype
        return True

    @property
    def diagnostics(self) -> Diagnostics:
        """The diagnostics and merge report (`.report`) of the live merge; empty for the original VLM."""
        return self._diagnostics if self._current not in (None, PARTIAL) else Diagnostics()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the VLM's original weights back (every tensor a merge or snapshot changed). A whole
        live merge is kept as a snapshot, when the merger keeps any, so going back costs no merge."""
        self._restore(recycle=False)

    def _restore(self, recycle: bool) -> None:
        """restore(); recycle: a merge's own tensors that are not kept become spares (apply())."""
        keep = self._current not in (None, PARTIAL) and self.max_snapshots > 0
        key, diag, out_dtype = self._current, self._diagnostics, self._out_dtype
        self._current = PARTIAL  # until every tensor is back (an interrupt may stop us half way)
        kept: dict[str, torch.Tensor] = {}
        vlm_ck = None
        try:
            for c in list(self.dirty):
                p, where = self.params[c], self._place[c]
                if where.merged == "device":
                    if keep:
                        kept[c] = p.data
                    elif recycle:
                        self._add_spare(c, p.data)
                    p.data = self.original[c]
                else:
                    if keep:
                        kept[c] = self._to_host(p.detach(), out_dtype or self.vlm_dtypes[c])
                    if c in self.original:
                        p.copy_(self.original[c])
                    else:
                        vlm_ck = vlm_ck or Checkpoint.open(self.refs["vlm"])
                        p.copy_(vlm_ck.get(self.layouts["vlm"].lm[c]))
                self.dirty.discard(c)
        finally:
            if vlm_ck is not None:
                vlm_ck.close()
        if keep and kept:
            self._snapshots[key] = (kept, diag, out_dtype)
            self._snapshots.move_to_end(key)
            while len(self._snapshots) > self.max_snapshots:
                self._snapshots.popitem(last=False)
        self._current = None
