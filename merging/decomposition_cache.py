"""A disk cache of per-matrix decompositions (merging.linalg.Decomposition), shared by ip_merging
and the spectra/similarity analyses, so each task vector is decomposed once across merges and
analyses.

Keys. An entry is keyed by the sha256 of the matrix itself (dtype, shape, bytes) and the solver
(exact; or randomized with its k, seed and device type): a content key can never serve another
matrix, and it needs no help from the caller. Hashing costs ~1% of a decomposition. Callers that
know the checkpoints' fingerprints also file an alias (fingerprints of the model and the base,
the canonical matrix name, the compute dtype -> content key), so a later analysis finds the entry
without reading the tensors at all.

Storage is JSON-safe only: each entry is one safetensors file (tensors + string metadata; the
format holds no code), each alias one JSON file; files are written to a temp name and renamed, a
file that does not read back as expected is deleted and recomputed, never trusted. Exact (and
fast) entries keep every singular value and at least STORE_K basis vectors, so the spectra's k
and the merge's rank share one entry. The folder is bounded by MAX_BYTES (oldest files go first).
Small JSON records (file_record) keep per-block facts the analyses share, like dot products.

Entries of the analyses' "fast" solver (float32 Gram, merging.linalg) carry their own tag and are
never served to a request for the exact or the randomized solver, so ip_merging reads only what
it would compute; a "fast" request is served an exact entry when there is one.

Location: $MERGE_LAB_CACHE/decompositions, else ~/.cache/merge-lab/decompositions (the analysis
cache's folder); MERGE_LAB_DECOMPOSITION_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging import lab_cache, linalg
from merging.linalg import Decomposition

SCHEMA = "2"  # 2: the basis stored transposed ("vt")
STORE_K = 64
MAX_BYTES = 4 * 2**30
_EVICT_EVERY = 64


def default_dir() -> Path:
    return lab_cache.root() / "decompositions"


def enabled() -> bool:
    return os.environ.get("MERGE_LAB_DECOMPOSITION_CACHE", "1").lower() not in ("0", "off", "false", "no")


def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the content key)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def alias_key(fp_model: str, fp_base: str, canonical: str, dtype) -> str:
    """The alias of a task vector W_model - W_base of one matrix computed in `dtype`."""
    return json.dumps([SCHEMA, fp_model, fp_base, canonical, str(dtype).removeprefix("torch.")])


FAST_TAG = "fast-f32"


def pair_key(fingerprints: dict, layer: int) -> str:
    """The record of one decoder block's task-vector dot products (analysis.similarity's cosines)."""
    return json.dumps([SCHEMA, "dots", fingerprints["vlm"], fingerprints["reasoner"], fingerprints["base"],
                       int(layer)])


def _tag(solver: str, k: int, seed: int, device) -> str:
    if solver in ("exact", "fast"):
        return "exact" if solver == "exact" else FAST_TAG
    return f"lowrank-k{k}-s{seed}-{torch.device(device).type}"


@dataclass
class Request:
    """One matrix to decompose: the tensor, or a loader for it; an alias when the caller knows one."""

    tensor: torch.Tensor | None = None
    load: Callable[[], torch.Tensor] | None = None
    alias: str | None = None

    def get(self) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = self.load()
        return self.tensor


class DecompositionCache:
    def __init__(self, directory: str | Path | None = None, max_bytes: int = MAX_BYTES):
        self.directory = Path(directory).expanduser() if directory else default_dir()
        self.max_bytes, self._stores = max_bytes, 0

    def _entry(self, key: str, tag: str) -> Path:
        return self.directory / key[:2] / f"{key}.{tag}.safetensors"

    def _alias_path(self, alias: str) -> Path:
        return self.directory / "aliases" / f"{hashlib.sha256(alias.encode()).hexdigest()[:40]}.json"

    def lookup(self, key: str, shape, k: int, tag: str, need_v: bool, device) -> Decomposition | None:
        """The cached decomposition (top k on `device`), or None; a bad file is deleted."""
        path = self._entry(key, tag)
        if not path.is_file():
            return None
        try:
            d = _read(path, shape, k, tag, need_v)
            os.utime(path)  # recently used: evicted last
        except Exception:  # anything unexpected in the file: recompute, never trust it
            path.unlink(missing_ok=True)
            return None
        if d is None:
            return None
        return Decomposition(d.s.to(device), d.v.to(device), d.nuclear, d.exact,
                             None if d.all_s is None else d.all_s.to(device))

    def store(self, key: str, tag: str, d: Decomposition) -> None:
        path = self._entry(key, tag)
        tensors = {"s": (d.s if d.all_s is None else d.all_s).detach().cpu().double().contiguous(),
                   "vt": d.v.detach().cpu().float().T.contiguous()}
        meta = {"schema": SCHEMA, "nuclear": repr(float(d.nuclear)), "exact": str(int(d.exact))}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk costs a recompute later, never the merge
            return
        self._stores += 1
        if self._stores % _EVICT_EVERY == 0:
            self.evict()

    def resolve(self, alias: str) -> tuple[str, tuple] | None:
        """(content key, shape) filed under an alias, or None."""
        try:
            rec = lab_cache.read_json(self._alias_path(alias))
            if rec["alias"] != alias or not isinstance(rec["key"], str):
                return None
            return rec["key"], tuple(int(x) for x in rec["shape"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def file_alias(self, alias: str, key: str, shape) -> None:
        path = self._alias_path(alias)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"alias": alias, "key": key, "shape": list(shape)}))
            os.replace(tmp, path)
        except OSError:
            pass

    def _record_path(self, key: str) -> Path:
        return self.directory / "records" / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"

    def record(self, key: str) -> dict | None:
        """The JSON object filed under `key` (file_record), or None."""
        try:
            rec = lab_cache.read_json(self._record_path(key))
            return rec["data"] if rec["key"] == key and isinstance(rec["data"], dict) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def file_record(self, key: str, data: dict) -> None:
        """File a small JSON object (plain data) under `key`: facts about task vectors that are
        cheap to keep and costly to recompute (their reading), like the blocks' dot products."""
        path = self._record_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"key": key, "data": data}))
            os.replace(tmp, path)
        except OSError:
            pass

    def evict(self) -> None:
        """Delete the least recently used entries until the folder is under max_bytes."""
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.directory.glob("*/*.safetensors")]
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


def _read(path: Path, shape, k: int, tag: str, need_v: bool) -> Decomposition | None:
    """Read and check one entry; None when it holds fewer basis vectors than asked for. The basis
    is stored transposed (one vector a row), so only the k rows asked for are read; need_v=False
    reads none (v then has no columns)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("schema") != SCHEMA or set(f.keys()) != {"s", "vt"}:
            raise ValueError("not a decomposition entry")
        s, vt = f.get_tensor("s"), f.get_slice("vt")
        rows, cols = vt.get_shape()
        if vt.get_dtype() != "F32" or cols != shape[1]:
            raise ValueError("malformed decomposition entry")
        if need_v and rows < k:
            return None
        v = vt[:k if need_v else 0].T.contiguous()  # the layout a fresh one has: equal bits downstream
    nuclear, exact = float(meta["nuclear"]), meta["exact"] == "1"
    full = tag in ("exact", FAST_TAG)  # these keep every singular value
    if (s.dtype != torch.float64 or s.dim() != 1 or not math.isfinite(nuclear) or exact != (tag == "exact")
            or (full and s.shape[0] != min(shape)) or s.shape[0] < k):
        raise ValueError("malformed decomposition entry")
    return Decomposition(s[:k].clone(), v, nuclear, exact, s if full else None)


def _top(d: Decomposition, k: int) -> Decomposition:
    return Decomposition(d.s[:k], d.v[:, :k].contiguous(), d.nuclear, d.exact, d.all_s)


def _compute(mats: list[torch.Tensor], k: int | None, method: str, seed: int) -> list[Decomposition]:
    """Decompose the misses: exact and fast ones with at least STORE_K basis vectors (what is
    stored), batched by shape; randomized ones with exactly k (their values depend on k)."""
    out: list[Decomposition | None] = [None] * len(mats)
    sol = [linalg.solver(m.shape, k, method) for m in mats]
    stored_k = None if k is None else max(int(k), STORE_K)
    for name, kk in (("exact", stored_k), ("fast", stored_k), ("lowrank", k)):
        idx = [i for i, s in enumerate(sol) if s == name]
        if idx:
            for i, d in zip(idx, linalg.decompose_many([mats[i] for i in idx], kk, name, seed)):
                out[i] = d
    return out  # type: ignore[return-value]


def decompose_cached(requests: list[Request], k: int | None, method: str = "auto", seed: int = 0,
                     cache: DecompositionCache | None = None, need_v: bool = True,
                     device="cpu") -> list[Decomposition]:
    """linalg.decompose of each request's matrix (top k, solver `method`), served from the cache
    where it holds the matrix, computed (batched by shape) and filed otherwise.

    need_v=False: the caller uses only the values and the nuclear norm (the spectra), so an exact
    entry with fewer basis vectors than k still serves, and a served entry's v has no columns.
    `device`: where a request without a tensor would be decomposed (it names the randomized
    solver's entries)."""
    if cache is None:
        if not enabled():
            return linalg.decompose_many([r.get() for r in requests], k, method, seed)
        cache = DecompositionCache()
    out: list[Decomposition | None] = [None] * len(requests)
    for i, r in enumerate(requests):  # aliases first: a hit reads no tensor at all
        hit = cache.resolve(r.alias) if r.alias else None
        if hit is not None:
            where = device if r.tensor is None else r.tensor.device
            out[i] = _lookup(cache, hit[0], hit[1], k, method, seed, need_v, where)
    keys: dict[int, str] = {}
    for i, r in enumerate(requests):
        if out[i] is None:
            t = r.get()
            keys[i] = digest(t)
            out[i] = _lookup(cache, keys[i], t.shape, k, method, seed, need_v, t.device)
            if out[i] is not None and r.alias:
                cache.file_alias(r.alias, keys[i], t.shape)
    todo = [i for i, d in enumerate(out) if d is None]
    for i, d in zip(todo, _compute([requests[i].get() for i in todo], k, method, seed)):
        t = requests[i].tensor
        kk = _clamp(k, t.shape)
        # A fast request the float32 bound refused was solved exactly: filed as the exact entry.
        cache.store(keys[i], "exact" if d.exact else _tag(linalg.solver(t.shape, kk, method), kk, seed, t.device), d)
        if requests[i].alias:
            cache.file_alias(requests[i].alias, keys[i], t.shape)
        out[i] = _top(d, kk)
    return out  # type: ignore[return-value]


def _clamp(k: int | None, shape) -> int:
    full = min(shape)
    return full if k is None else max(1, min(int(k), full))


def _lookup(cache: DecompositionCache, key: str, shape, k, method, seed, need_v, device) -> Decomposition | None:
    kk = _clamp(k, shape)
    how = linalg.solver(shape, kk, method)
    # A fast request takes an exact entry first (what ip_merging filed): exact beats float32.
    for tag in (("exact", FAST_TAG) if how == "fast" else (_tag(how, kk, seed, device),)):
        d = cache.lookup(key, shape, kk, tag, need_v, device)
        if d is not None:
            return d
    return None
