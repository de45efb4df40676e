"""Singular-value spectra of the task vectors tau_v = W_v - W_0 and tau_r = W_r - W_0.

For every decoder layer and 2-D projection matrix of the triple: the top singular values of
both task vectors (the IP-Merging paper's Fig. 4: the reasoner's are larger) and the
nuclear-norm ratio sum S_v / sum S_r, which is the rescale factor lambda_n ip_merging uses.

Tensors are read lazily one at a time through Checkpoint + layout, so memory stays at a few
matrices whatever the model size. The decompositions come from merging.decomposition_cache, the
same entries ip_merging reads and files, so spectra after a merge (or a merge after the spectra)
decompose nothing again. This module also holds the triple iteration similarity.py shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.cache import cached
from merging import decomposition_cache as dc
from merging.checkpoint import Checkpoint
from merging.errors import LabError
from merging.layout import derive_layout
from merging.linalg import decompose, decompose_many

# The 2-D projection matrices of a decoder block, in display order (canonical rest names).
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class Triple:
    """The three opened checkpoints and their layouts, viewed through canonical names."""

    vlm: object
    reasoner: object
    base: object
    layouts: dict  # "vlm" | "reasoner" | "base" -> Layout

    @property
    def num_layers(self) -> int:
        return self.layouts["vlm"].num_layers

    @property
    def fingerprints(self) -> dict[str, str]:
        return {"vlm": self.vlm.fingerprint, "reasoner": self.reasoner.fingerprint, "base": self.base.fingerprint}

    def has(self, canonical: str) -> bool:
        return all(canonical in lay.lm for lay in self.layouts.values())

    def get(self, role: str, canonical: str, device="cpu") -> torch.Tensor:
        ck = getattr(self, role)
        # float32 always: bf16 differences of nearly equal weights lose most of their bits.
        return ck.get(self.layouts[role].lm[canonical], device=device).float()

    def task_vectors(self, canonical: str, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        w0 = self.get("base", canonical, device)
        tau_v = self.get("vlm", canonical, device) - w0
        tau_r = self.get("reasoner", canonical, device) - w0
        if tau_v.shape != tau_r.shape:
            raise LabError(f"{canonical}: VLM {tuple(tau_v.shape)} and reasoner {tuple(tau_r.shape)} differ in shape")
        return tau_v, tau_r

    def layer_names(self, layer: int) -> list[str]:
        """Canonical names of a decoder block present in all three models."""
        return [c for c in self.layouts["vlm"].layer_names(layer) if self.has(c)]


@contextmanager
def open_triple(vlm, reasoner, base) -> Iterator[Triple]:
    """Open three refs (folder or hub id) as a Triple; closes them on exit."""
    if base is None:
        raise LabError("this analysis needs the shared base model ('base' in the recipe)")
    with ExitStack() as stack:
        cks = {role: stack.enter_context(Checkpoint.open(ref))
               for role, ref in (("vlm", vlm), ("reasoner", reasoner), ("base", base))}
        layouts = {role: derive_layout(ck) for role, ck in cks.items()}
        nv, nr, nb = (layouts[r].num_layers for r in ("vlm", "reasoner", "base"))
        if not nv == nr == nb:
            raise LabError(f"layer counts differ: VLM {nv}, reasoner {nr}, base {nb}; not one family")
        yield Triple(cks["vlm"], cks["reasoner"], cks["base"], layouts)


def matrices(triple: Triple, modules=MODULES) -> list[tuple[int, str, str]]:
    """(layer, module, canonical name) of every projection weight all three models have."""
    out = []
    for layer in range(triple.num_layers):
        for m in modules:
            c = f"layers.{layer}.{m}.weight"
            if triple.has(c):
                out.append((layer, m, c))
    return out


def spectrum(m: torch.Tensor, k: int, method: str = "auto") -> tuple[list[float], float, bool]:
    """(top-k singular values, the exact nuclear norm, whether the top-k values are exact).

    The same decomposition ip_merging uses (merging.linalg.decompose, same solver rule): the
    nuclear norm is always exact; on large matrices with method "auto" or "lowrank" the top-k
    values shown come from the randomized solver, as in the merge.
    """
    d = decompose(m, k, method)
    return d.s.tolist(), d.nuclear, d.exact


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def decomposition_dir(cache_dir=None):
    """The decomposition cache's folder: beside the analysis cache, where ip_merging files its own."""
    return Path(cache_dir).expanduser() / "decompositions" if cache_dir else dc.default_dir()


def layer_decompositions(triple: Triple, canonicals: list[str], k: int, method: str, device="cpu",
                         need_v: bool = True, cache_dir=None, pairs: dict | None = None,
                         use_cache: bool = True) -> list:
    """[(dv, dr)] of these matrices' task vectors: from the decomposition cache (by the
    checkpoints' fingerprints, without reading a tensor; else by content), or computed in one
    batched call and filed there. `pairs` (canonical -> (tau_v, tau_r)) holds task vectors the
    caller has already read; the others are read on a miss only. use_cache=False: computed."""
    fp = triple.fingerprints
    pairs = {} if pairs is None else pairs

    def loader(c: str, j: int):
        def load():
            if c not in pairs:
                pairs[c] = triple.task_vectors(c, device)
            return pairs[c][j]
        return load

    if not use_cache or not dc.enabled():
        decs = decompose_many([loader(c, j)() for c in canonicals for j in (0, 1)], k, method)
    else:
        reqs = [dc.Request(load=loader(c, j), alias=dc.alias_key(fp[role], fp["base"], c, torch.float32))
                for c in canonicals for j, role in enumerate(("vlm", "reasoner"))]
        decs = dc.decompose_cached(reqs, k, method, cache=dc.DecompositionCache(decomposition_dir(cache_dir)),
                                   need_v=need_v, device=device)
    return list(zip(decs[0::2], decs[1::2]))


def compute_spectra(triple: Triple, k: int = 64, method: str = "auto", device="cpu", progress=None,
                    cache_dir=None, use_cache: bool = True) -> dict:
    """Spectra and nuclear-norm ratios for every (layer, module); plain data for caching/JSON.

    Returns {"k", "method", "num_layers", "modules", "entries": [{"layer", "module", "s_v", "s_r",
    "nuclear_v", "nuclear_r", "ratio", "exact"}], "ratio": [[per module] per layer]}.
    Decompositions come from the decomposition cache (the one ip_merging fills), a layer at a time;
    use_cache=False computes them all.
    """
    todo = matrices(triple)
    if not todo:
        raise LabError("no projection matrices (q/k/v/o/gate/up/down) are shared by the three models")
    entries = []
    for layer in range(triple.num_layers):
        mine = [(m, c) for lay, m, c in todo if lay == layer]
        if not mine:
            continue
        if progress:
            progress(len(entries), len(todo), f"spectra: layer {layer}")
        decs = layer_decompositions(triple, [c for _, c in mine], k, method, device, False, cache_dir,
                                    use_cache=use_cache)
        for (module, _), (dv, dr) in zip(mine, decs):
            entries.append({"layer": layer, "module": module, "s_v": dv.s.tolist(), "s_r": dr.s.tolist(),
                            "nuclear_v": dv.nuclear, "nuclear_r": dr.nuclear,
                            "ratio": _ratio(dv.nuclear, dr.nuclear), "exact": dv.exact and dr.exact})
    if progress:
        progress(len(todo), len(todo), "spectra: done")
    modules = [m for m in MODULES if any(e["module"] == m for e in entries)]
    return {"k": k, "method": method, "num_layers": triple.num_layers, "modules": modules,
            "entries": entries, "ratio": grid(entries, "ratio", triple.num_layers, modules)}


def grid(entries: list[dict], field: str, num_layers: int, modules: list[str]) -> list[list[float | None]]:
    """entries -> [layer][module] matrix of one field (None where a matrix is missing)."""
    out = [[None] * len(modules) for _ in range(num_layers)]
    col = {m: j for j, m in enumerate(modules)}
    for e in entries:
        if e["module"] in col:
            out[e["layer"]][col[e["module"]]] = e[field]
    return out


def cached_on_triple(name: str, vlm, reasoner, base, params: dict, compute, cache_dir=None,
                     use_cache: bool = True) -> dict:
    """Open the triple and return compute(triple), served from the cache when the same triple
    (by fingerprints) and the same params were asked for before."""
    with open_triple(vlm, reasoner, base) as t:
        if not use_cache:
            return compute(t)
        return cached(name, {"fp": t.fingerprints, **params}, lambda: compute(t), cache_dir)


def spectra(vlm, reasoner, base, k: int = 64, method: str = "auto", device="cpu", progress=None,
            cache_dir=None, use_cache: bool = True) -> dict:
    """Open the triple, compute (or fetch from the cache) its spectra."""
    return cached_on_triple("spectra", vlm, reasoner, base, {"k": k, "method": method},
                            lambda t: compute_spectra(t, k, method, device, progress, cache_dir, use_cache),
                            cache_dir, use_cache)
