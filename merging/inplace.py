"""Merge into a VLM already loaded in memory (the app's sliders), without writing a folder.

InPlaceMerger keeps, once per triple, the VLM's original LM weights (copied from the loaded
parameters) and the reasoner's / base's LM tensors (read through Checkpoint + layout), on the
device when they fit, else on the CPU. apply(recipe) always merges from those originals, never
from the previous merge, with the same plan and merge code as the streaming engine, so a merge
in place equals the folder written by `python -m merging merge` tensor for tensor.
"""

from __future__ import annotations

import torch

from merging import methods, params
from merging.engine import ROLES, Progress, check_device, merge_group, plan_groups, read_checked, torch_dtype
from merging.errors import LabError
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


class InPlaceMerger:
    """merger = InPlaceMerger(model, vlm_ref, reasoner_ref, base_ref, device); merger.apply(recipe);
    merger.restore(). `model` is the VLM loaded from vlm_ref (any device, usually its own dtype)."""

    def __init__(self, model, vlm_ref: str, reasoner_ref: str, base_ref: str | None = None,
                 device: str | None = None):
        from merging.compat import check_triple

        self.model = model
        self.refs = {"vlm": vlm_ref, "reasoner": reasoner_ref, **({"base": base_ref} if base_ref else {})}
        report = check_triple(vlm_ref, reasoner_ref, base_ref)
        report.raise_if_incompatible()
        self.layouts = report.layouts
        self.num_layers = self.layouts["vlm"].num_layers
        first = next(model.parameters())
        self.device = str(device or first.device)
        check_device(self.device)
        from merging.checkpoint import Checkpoint

        with Checkpoint.open(vlm_ref) as ck:
            vl = self.layouts["vlm"]
            shapes = {c: ck.shape(a) for c, a in vl.lm.items()}
            self.vlm_dtypes = {c: ck.dtype(a) for c, a in vl.lm.items()}
        names = map_parameters(model, shapes)
        named = dict(model.named_parameters(remove_duplicate=False))
        self.params = {c: named[n] for c, n in names.items()}
        need = sum(p.numel() * p.element_size() for p in self.params.values()) * len(self.refs)
        self.store = self.device if self._fits(need) else "cpu"
        self.original = {c: p.detach().to(self.store, copy=True) for c, p in self.params.items()}
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
        from merging.checkpoint import Checkpoint

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

    @torch.no_grad()
    def apply(self, recipe, progress=None, cancel=None) -> dict:
        """Merge `recipe` (its method, knobs, layers, embeddings, dtypes, seed; the triple is the
        one given at construction) into the model. Returns the method's diagnostics (ctx.extra).
        On an error or cancel the model is restored to the VLM's weights."""
        method = methods.get(recipe.method)
        if method.needs_base and "base" not in self.refs:
            raise LabError(f"method {method.name!r} needs a base model; this merger was built without one")
        params.validate_lengths(recipe, self.num_layers)
        groups, _ = plan_groups(recipe, method, self.layouts)
        self._load([c for g in groups for c in g.names])
        cdtype = torch_dtype(recipe.dtype)
        knobs = recipe.knobs()
        ctx = MergeContext(seed=recipe.seed, device=self.device, num_layers=self.num_layers)
        bar = Progress(sum(len(g.names) for g in groups), progress, cancel, bar=False)
        try:
            self.restore()
            for g in groups:
                bar.check()
                sets = {c: TensorSet(c, g.layer, *(self._tensor(r, c, cdtype) for r in ROLES)) for c in g.names}
                out = merge_group(method, g, sets, knobs, ctx)
                for c, res in out.items():
                    dtype = torch_dtype(recipe.out_dtype) if recipe.out_dtype else self.vlm_dtypes[c]
                    self.params[c].copy_(res.to(dtype))
                    self.dirty.add(c)
                del sets, out
                bar.step(len(g.names), f"layer {g.layer}" if g.layer is not None else g.names[0])
        except BaseException:
            self.restore()
            raise
        return ctx.extra

    @torch.no_grad()
    def restore(self) -> None:
        """Put the VLM's original weights back (only the tensors a merge changed)."""
        for c in self.dirty:
            self.params[c].copy_(self.original[c])
        self.dirty.clear()
