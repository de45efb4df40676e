"""Singular-value spectra of the task vectors tau_v = W_v - W_0 and tau_r = W_r - W_0.

For every decoder layer and 2-D projection matrix of the triple: the top singular values of
both task vectors (the IP-Merging paper's Fig. 4: the reasoner's are larger) and the
nuclear-norm ratio sum S_v / sum S_r, which is the rescale factor lambda_n ip_merging uses.

Tensors are read lazily one at a time through Checkpoint + layout, so memory stays at a few
matrices whatever the model size. The decompositions come from merging.decomposition_cache: the
exact entries ip_merging files when there are some (spectra after a merge decompose nothing),
else the "fast" solver of merging.linalg [choice]: the Gram eigen-decomposition in float32, about
half the CPU time of the exact float64 one. Its nuclear norms (hence the ratio) are within
linalg.FAST_NUCLEAR_RTOL of the exact ones by a first-order bound checked per matrix, and a matrix
that fails the bound is decomposed exactly; its top-k values are float32-accurate, not randomized.
Its entries are filed under their own tag, never served to ip_merging; the similarity analysis
reads them (one decomposition per task vector for both analyses). method="exact" gives the
float64 path throughout. This module also holds the triple iteration similarity.py shares.
"""

from __future__ import annotations

import math
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


def spectrum(m: torch.Tensor, k: int, method: str = "fast") -> tuple[list[float], float, bool]:
    """(top-k singular values, the nuclear norm, whether the top-k values come from a full
    decomposition rather than the randomized solver).

    merging.linalg.decompose: the nuclear norm is exact ("fast": within FAST_NUCLEAR_RTOL); on
    large matrices with method "auto" or "lowrank" the top-k values shown come from the
    randomized solver, as in the merge.
    """
    d = decompose(m, k, method)
    return d.s.tolist(), d.nuclear, full_spectrum(d)


def full_spectrum(d) -> bool:
    """Whether a decomposition's values come from a full (exact or float32) eigen-decomposition."""
    return d.exact or d.all_s is not None


def solver_name(d) -> str:
    return "exact" if d.exact else "float32" if d.all_s is not None else "randomized"


@contextmanager
def one_thread(device, progress=None):
    """Run the block with one CPU thread; yields `progress` wrapped to run with the threads it had.

    The block is many mid-sized ops (float32 Grams, eigh, reads, hashing); with two threads on a
    2-core machine other jobs also use, each op's thread barrier waits on a descheduled thread
    (measured, Qwen2-0.5B-shaped spectra + similarity at load ~2.6: 54 s on 2 threads, 35 s on 1).
    (linalg.side_by_side, matrices decomposed in a thread pool, is not used here: with it an
    interrupt of `python -m analysis report` was sometimes lost, seen in CI, not yet explained.)
    The progress callback may answer the app's chat lane, which keeps its threads.
    """
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or before == 1:
        yield progress
        return

    def wrapped(*args, **kwargs):
        torch.set_num_threads(before)
        try:
            return progress(*args, **kwargs)
        finally:
            torch.set_num_threads(1)

    torch.set_num_threads(1)
    try:
        yield wrapped if progress else None
    finally:
        torch.set_num_threads(before)


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


def dot_stats(tau_v: torch.Tensor, tau_r: torch.Tensor) -> list[float]:
    """[<tau_v, tau_r>, |tau_v|^2, |tau_r|^2] of two tensors flattened, in float32."""
    a, b = tau_v.float().flatten(), tau_r.float().flatten()
    return [float(a @ b), float(a @ a), float(b @ b)]


def _decomposition_cache(cache_dir, use_cache: bool):
    return dc.DecompositionCache(decomposition_dir(cache_dir)) if use_cache and dc.enabled() else None


def layer_dots(triple: Triple, layer: int, cache_dir=None, use_cache: bool = True) -> dict | None:
    """canonical -> dot_stats of every tensor of the block, as the spectra filed them, or None.
    Shared so the similarity that follows the spectra reads no tensor again."""
    cache = _decomposition_cache(cache_dir, use_cache)
    rec = cache.record(dc.pair_key(triple.fingerprints, layer)) if cache else None
    names = triple.layer_names(layer)
    if rec is None or set(rec) != set(names):
        return None
    ok = all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, float) and math.isfinite(x) for x in v)
             for v in rec.values())
    return rec if ok else None


def file_layer_dots(triple: Triple, layer: int, pairs: dict, device="cpu", cache_dir=None,
                    use_cache: bool = True, stats: dict | None = None) -> dict:
    """dot_stats of every tensor of the block (those in `pairs` or `stats` are not read again),
    filed in the decomposition cache's folder for layer_dots."""
    stats = dict(stats or {})
    for c in triple.layer_names(layer):
        if c not in stats:
            stats[c] = dot_stats(*(pairs[c] if c in pairs else triple.task_vectors(c, device)))
    cache = _decomposition_cache(cache_dir, use_cache)
    if cache:
        cache.file_record(dc.pair_key(triple.fingerprints, layer), stats)
    return stats


def compute_spectra(triple: Triple, k: int = 64, method: str = "fast", device="cpu", progress=None,
                    cache_dir=None, use_cache: bool = True) -> dict:
    """Spectra and nuclear-norm ratios for every (layer, module); plain data for caching/JSON.

    Returns {"k", "method", "num_layers", "modules", "entries": [{"layer", "module", "s_v", "s_r",
    "nuclear_v", "nuclear_r", "ratio", "exact", "solver"}], "ratio": [[per module] per layer]};
    "exact": the values are not randomized; "solver": [VLM's, reasoner's], each "exact",
    "float32" (the fast solver) or "randomized".
    Decompositions come from the decomposition cache (the one ip_merging fills), a layer at a time;
    use_cache=False computes them all. A layer whose matrices had to be read also files its
    blocks' dot products there (file_layer_dots), for the similarity analysis.
    """
    with one_thread(device, progress) as progress:
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
            pairs: dict = {}
            decs = layer_decompositions(triple, [c for _, c in mine], k, method, device, False, cache_dir,
                                        pairs, use_cache)
            if use_cache and dc.enabled() and len(pairs) == len(mine):
                # Every matrix was read for its decomposition: the similarity's dot products cost
                # little more now (the norms) and a second read of the checkpoints later.
                file_layer_dots(triple, layer, pairs, device, cache_dir, use_cache)
            del pairs
            for (module, _), (dv, dr) in zip(mine, decs):
                entries.append({"layer": layer, "module": module, "s_v": dv.s.tolist(), "s_r": dr.s.tolist(),
                                "nuclear_v": dv.nuclear, "nuclear_r": dr.nuclear,
                                "ratio": _ratio(dv.nuclear, dr.nuclear),
                                "exact": full_spectrum(dv) and full_spectrum(dr),
                                "solver": [solver_name(dv), solver_name(dr)]})
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


def spectra(vlm, reasoner, base, k: int = 64, method: str = "fast", device="cpu", progress=None,
            cache_dir=None, use_cache: bool = True) -> dict:
    """Open the triple, compute (or fetch from the cache) its spectra."""
    return cached_on_triple("spectra", vlm, reasoner, base, {"k": k, "method": method},
                            lambda t: compute_spectra(t, k, method, device, progress, cache_dir, use_cache),
                            cache_dir, use_cache)
