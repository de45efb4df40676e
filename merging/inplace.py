"""Merge into a VLM already loaded in memory (the app's sliders), without writing a folder.

InPlaceMerger keeps, once per triple, the VLM's original LM weights (copied from the loaded
parameters) and the reasoner's / base's LM tensors (read through Checkpoint + layout), on the
device when they fit, else on the CPU. apply(recipe) always merges from those originals, never
from the previous merge, with the same plan and merge code as the streaming engine, so a merge
in place equals the folder written by `python -m merging merge` tensor for tensor.

The merger is the one owner of the model's LM weights: callers change them only through apply(),
load_snapshot() and restore(), and read what is live from `current` / `weights_id`. Snapshots of
recent merges live inside it, so restore() always knows which tensors differ from the VLM's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import torch

from merging import merge_report, methods, params
from merging.checkpoint import Checkpoint
from merging.compat import check_triple
from merging.engine import ROLES, Progress, check_device, merge_group, plan_groups, read_checked, torch_dtype
from merging.errors import LabError
from merging.hub import resolve
from merging.methods import MergeContext, TensorSet


def _qualified_name(model, module) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def map_parameters(model, shapes: dict[str, tuple]) -> dict[str, str]:
    """canonical LM name -> the loaded model's parameter name.

    Derived, not hard-coded per family: the decoder module (get_decoder()) gives the prefix of
    layers/norm/embeddings and get_output_embeddings() the lm_head; when that fails, a unique
    parameter whose name ends with ".{canonical}" and whose shape matches is taken.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    get_dec = getattr(model, "get_decoder", None)
    dec = _qualified_name(model, get_dec()) if callable(get_dec) else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = _qualified_name(model, get_head()) if callable(get_head) else None
    out = {}
    for c, shape in shapes.items():
        guess = (f"{head}.weight" if head is not None else None) if c == "lm_head.weight" else (
            f"{dec}.{c}" if dec else c)
        if guess in named and tuple(named[guess].shape) == tuple(shape):
            out[c] = guess
            continue
        cands = [n for n, p in named.items() if (n == c or n.endswith("." + c)) and tuple(p.shape) == tuple(shape)]
        if dec:
            cands = [n for n in cands if n.startswith(dec + ".")] or cands
        if len(cands) != 1:
            raise LabError(f"cannot find the loaded model's parameter for {c} {tuple(shape)}: "
                           f"{len(cands)} candidates{' (' + ', '.join(cands[:3]) + ')' if cands else ''}")
        out[c] = cands[0]
    return out


def merge_key(recipe) -> str:
    """What a merge's weights depend on besides the triple (method, knobs with defaults filled in,
    layers, embeddings, dtypes, seed), hashed: the name of a merged state."""
    d = {"method": recipe.method, "knobs": recipe.knobs(), "layers": list(recipe.layers) if recipe.layers else None,
         "embeddings": recipe.embeddings, "dtype": recipe.dtype, "out_dtype": recipe.out_dtype, "seed": recipe.seed}
    text = json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_id(fingerprints: dict[str, str], key: str | None) -> str:
    """Identity of a set of live weights, for caches: the VLM checkpoint's fingerprint for the
    original (key None), else a hash of the triple's fingerprints and the merge key."""
    if key is None:
        return f"checkpoint:{fingerprints['vlm']}"
    text = json.dumps([dict(sorted(fingerprints.items())), key], separators=(",", ":"))
    return f"merge:{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def triple_fingerprints(vlm_ref: str, reasoner_ref: str, base_ref: str | None = None) -> dict[str, str]:
    """{"vlm", "reasoner"[, "base"]} -> checkpoint fingerprint, the roles weights_id() expects."""
    out = {}
    for role, ref in (("vlm", vlm_ref), ("reasoner", reasoner_ref), ("base", base_ref)):
        if ref:
            with Checkpoint.open(ref) as ck:
                out[role] = ck.fingerprint
    return out


# `current` while the weights are being changed, or after a change was interrupted: matches no
# key and is not None, so every caller's next step re-establishes a known state.
PARTIAL = "(partial)"


class InPlaceMerger:
    """merger = InPlaceMerger(model, vlm_ref, reasoner_ref, base_ref, device); merger.apply(recipe);
    merger.restore(). `model` is the VLM loaded from vlm_ref (any device, usually its own dtype).

    snapshots: how many recent merges to keep a copy of (so switching back is a copy, not a
    re-merge); kept only when the LM is below snapshot_max_bytes."""

    def __init__(self, model, vlm_ref: str, reasoner_ref: str, base_ref: str | None = None,
                 device: str | None = None, snapshots: int = 0, snapshot_max_bytes: int = 256 * 2**20):
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
        lm_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
        self.store = self.device if self._fits(lm_bytes * len(self.refs)) else "cpu"
        self.original = {c: p.detach().to(self.store, copy=True) for c, p in self.params.items()}
        self.max_snapshots = snapshots if lm_bytes <= snapshot_max_bytes else 0
        # key -> (the tensors that merge changed, its diagnostics); most recently used last
        self._snapshots: OrderedDict[str, tuple[dict[str, torch.Tensor], dict]] = OrderedDict()
        self._current: str | None = None
        self._extra: dict = {}  # diagnostics and merge report of the live merge
        self._fingerprints: dict[str, str] | None = None
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        # Decoder layers and final norm now (every method reads them); vocabulary tensors on demand.
        self._load([c for c in self.layouts["vlm"].lm if not c.startswith(("embed_tokens", "lm_head"))])
        self.dirty: set[str] = set()

    @classmethod
    def from_recipe(cls, model, recipe, device: str | None = None) -> InPlaceMerger:
        """The merger for a recipe's triple (the base is read only when the recipe names one)."""
        return cls(model, recipe.vlm, recipe.reasoner, recipe.base, device)

    def _fits(self, nbytes: int) -> bool:
        dev = torch.device(self.device)
        if dev.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(dev)
        return nbytes < 0.8 * free

    def _load(self, canonicals: list[str]) -> None:
        for role in ("reasoner", "base"):
            if role not in self.refs:
                continue
            todo = [c for c in canonicals if (role, c) not in self.cache and c in self.layouts[role].lm]
            if not todo:
                continue
            with Checkpoint.open(self.refs[role]) as ck:
                for c in todo:
                    self.cache[(role, c)] = read_checked(ck, self.layouts[role].lm[c], role, self.store)

    def _tensor(self, role: str, c: str, dtype: torch.dtype) -> torch.Tensor | None:
        if role == "vlm":
            t = self.original[c]
        elif role in self.refs:
            t = self.cache[(role, c)]
        else:
            return None
        return t.to(device=self.device, dtype=dtype)

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
        """Keys of the merges kept as snapshots, oldest first."""
        return list(self._snapshots)

    # -- changing the weights -------------------------------------------------------------------
    def _check_triple(self, recipe) -> None:
        for role in ROLES:
            ref = getattr(recipe, role)
            if role == "base" and not ref:
                continue  # a method without a base never reads it
            if role not in self.refs or os.path.realpath(resolve(ref)) != os.path.realpath(resolve(self.refs[role])):
                raise LabError(f"this merger holds {self.refs.get(role)} as the {role}; the recipe names {ref}")

    @torch.no_grad()
    def apply(self, recipe, progress=None, cancel=None) -> dict:
        """Merge `recipe` (its method, knobs, layers, embeddings, dtypes, seed; its triple must be
        the one given at construction) into the model. Returns the method's diagnostics
        (ctx.extra). On an error or cancel the model is restored to the VLM's weights."""
        method = methods.get(recipe.method)
        if method.needs_base and "base" not in self.refs:
            raise LabError(f"method {method.name!r} needs a base model; this merger was built without one")
        self._check_triple(recipe)
        params.validate_lengths(recipe, self.num_layers)
        groups, _ = plan_groups(recipe, method, self.layouts)
        self._load([c for g in groups for c in g.names])
        cdtype = torch_dtype(recipe.dtype)
        knobs = recipe.knobs()
        ctx = MergeContext(seed=recipe.seed, device=self.device, num_layers=self.num_layers)
        ctx.extra["fingerprints"] = self.fingerprints  # lets ip_merging file its decompositions for the analyses
        bar = Progress(sum(len(g.names) for g in groups), progress, cancel, bar=False)
        try:
            self.restore()
            self._current = PARTIAL
            for g in groups:
                bar.check()
                sets = {c: TensorSet(c, g.layer, *(self._tensor(r, c, cdtype) for r in ROLES)) for c in g.names}
                out = merge_group(method, g, sets, knobs, ctx)
                for c, res in out.items():
                    dtype = torch_dtype(recipe.out_dtype) if recipe.out_dtype else self.vlm_dtypes[c]
                    self.dirty.add(c)  # before the copy: an interrupt between the two must not hide it
                    self.params[c].copy_(res.to(dtype))
                del sets, out
                bar.step(len(g.names), f"layer {g.layer}" if g.layer is not None else g.names[0])
        except BaseException:
            self.restore()
            raise
        self._current = merge_key(recipe)
        ctx.extra["report"] = merge_report.build(method.name, ctx.extra, [c for g in groups for c in g.names])
        self._extra = ctx.extra
        self._keep_snapshot(ctx.extra)
        return ctx.extra

    def _keep_snapshot(self, extra: dict) -> None:
        if not self.max_snapshots:
            return
        snap = {c: self.params[c].detach().clone() for c in self.dirty}
        self._snapshots[self._current] = (snap, dict(extra))
        self._snapshots.move_to_end(self._current)
        while len(self._snapshots) > self.max_snapshots:
            self._snapshots.popitem(last=False)

    @torch.no_grad()
    def load_snapshot(self, key: str) -> bool:
        """Make the model hold the kept merge `key` (a copy, no re-merge). False when not kept."""
        if key not in self._snapshots:
            return False
        if key == self._current:
            return True
        snap, extra = self._snapshots[key]
        self._snapshots.move_to_end(key)
        try:
            self.restore()
            self._current = PARTIAL
            for c, t in snap.items():
                self.dirty.add(c)
                self.params[c].copy_(t)
        except BaseException:
            self.restore()
            raise
        self._current, self._extra = key, extra
        return True

    @property
    def extra(self) -> dict:
        """The diagnostics (and merge report) of the live merge; {} for the original VLM."""
        return self._extra if self._current not in (None, PARTIAL) else {}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the VLM's original weights back (every tensor a merge or snapshot changed)."""
        self._current = PARTIAL  # until every copy is done (an interrupt may stop us half way)
        for c in list(self.dirty):
            self.params[c].copy_(self.original[c])
        self.dirty.clear()
        self._current = None
