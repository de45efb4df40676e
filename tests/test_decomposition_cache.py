"""One decomposition per task vector, shared by ip_merging and the spectra/similarity analyses
through the disk cache; every result against a full torch.linalg.svd reference (the previous
exact implementation), on the toy family and on an ill-conditioned pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis import similarity, spectra
from merging import decomposition_cache as dc
from merging import linalg, methods, params
from merging.methods import MergeContext, TensorSet
from tests.paths import TOY

TOY_REFS = (TOY / "vlm", TOY / "math", TOY / "base")


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(root: Path) -> dict[str, int]:
    """Entry file -> inode: a recomputed entry is written anew (a new inode), a hit only touched."""
    return {p.name: p.stat().st_ino for p in (root / "decompositions").glob("*/*.safetensors")}


def svd_reference(sets: dict[str, TensorSet], rank: int) -> tuple[dict, dict]:
    """ip_merging at threshold 0, lam 1, temperature 1 from full float64 SVDs: (scores, merged)."""
    scores, parts = {}, {}
    for name, t in sets.items():
        tv, tr = (t.vlm - t.base).double(), (t.reasoner - t.base).double()
        _, s_v, vh_v = torch.linalg.svd(tv, full_matrices=False)
        _, s_r, vh_r = torch.linalg.svd(tr, full_matrices=False)
        k = min(rank, len(s_v))
        dots = (vh_v[:k] * vh_r[:k]).sum(1).abs()
        scores[name] = float((s_v[:k] * dots).sum() / s_v[:k].sum())
        parts[name] = (tr, vh_v[:k].T, float(s_v.sum() / s_r.sum()))
    gamma = torch.softmax(torch.tensor(list(scores.values()), dtype=torch.float64), 0) * len(scores)
    merged = {n: sets[n].vlm.double() + g * lam_n * tr @ v @ v.T
              for (n, (tr, v, lam_n)), g in zip(parts.items(), gamma.tolist())}
    return scores, merged


def ip_merge(sets: dict[str, TensorSet], rank: int, layer: int = 0, fingerprints=None):
    m = methods.get("ip_merging")
    p = params.resolve(m, {"rank": rank, "threshold": 0.0, "top_fraction": 0.0, "svd": 1}, layer, layer + 1)
    ctx = MergeContext(num_layers=layer + 1, fingerprints=fingerprints or None)
    out = m.merge_layer(layer, sets, p, ctx)
    return ctx.diagnostics.methods["ip_merging"][layer]["scores"], out


def assert_equal_to_reference(sets, rank, scores, out):
    ref_scores, ref = svd_reference(sets, rank)
    for name in sets:
        assert scores[name] == pytest.approx(ref_scores[name], rel=1e-4), name
        update, ref_update = out[name].double() - sets[name].vlm.double(), ref[name] - sets[name].vlm.double()
        scale = float(ref_update.abs().max())
        assert float((update - ref_update).abs().max()) <= 1e-4 * scale, name


def toy_layer_sets(triple, layer: int) -> dict[str, TensorSet]:
    return {c: TensorSet(c, layer, *(triple.get(r, c) for r in ("vlm", "reasoner", "base")))
            for c in triple.layer_names(layer) if triple.get("vlm", c).dim() == 2}


def test_toy_family_ip_merging_equals_full_svd_cold_and_from_the_cache(cache_root):
    with spectra.open_triple(*TOY_REFS) as t:
        for layer in range(t.num_layers):
            sets = toy_layer_sets(t, layer)
            cold = ip_merge(sets, 32, layer, t.fingerprints)
            assert_equal_to_reference(sets, 32, *cold)
            cache, fp = dc.DecompositionCache(), t.fingerprints
            for c, ts in sets.items():  # filed under the fingerprints too: the analyses need no read
                for role, w in (("vlm", ts.vlm), ("reasoner", ts.reasoner)):
                    key, _ = cache.resolve(dc.alias_key(fp[role], fp["base"], c, torch.float32))
                    assert key == dc.digest(w - ts.base)
            before = entries(cache_root)
            warm = ip_merge(sets, 32, layer)
            assert entries(cache_root) == before  # served: nothing recomputed
            assert warm[0] == cold[0] and all(torch.equal(warm[1][n], cold[1][n]) for n in sets)


def test_ill_conditioned_pair_equals_full_svd(cache_root):
    from tests.test_linalg import ill_conditioned

    g = torch.Generator().manual_seed(5)
    sets = {}
    for name, (rows, cols) in {"layers.0.mlp.up_proj.weight": (300, 120),
                               "layers.0.mlp.down_proj.weight": (120, 300)}.items():
        base = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.02
        tau_v = ill_conditioned(rows, cols, cond_exp=8, seed=rows) * 0.01
        tau_r = ill_conditioned(rows, cols, cond_exp=7, seed=rows + 1) * 0.02
        # the float32 task vectors the method sees are the ones the reference decomposes
        sets[name] = TensorSet(name, 0, (base + tau_v).float(), (base + tau_r).float(), base.float())
    assert_equal_to_reference(sets, 16, *ip_merge(sets, 16))


def test_analyses_after_a_merge_and_a_merge_after_the_analyses_decompose_nothing(tmp_path, cache_root):
    from merging import recipe as recipe_mod
    from merging.engine import merge_to_disk

    rec = recipe_mod.from_dict({"vlm": str(TOY_REFS[0]), "reasoner": str(TOY_REFS[1]),
                                       "base": str(TOY_REFS[2]), "method": "ip_merging",
                                       "parameters": {"threshold": 0.0, "top_fraction": 0.0, "svd": 1}})
    merge_to_disk(rec, tmp_path / "out", bar=False)
    after_merge = entries(cache_root)
    assert after_merge
    spec = spectra.spectra(*TOY_REFS, k=64, method="exact", cache_dir=cache_root)
    sim = similarity.similarity(*TOY_REFS, rank=32, method="exact", cache_dir=cache_root)
    assert entries(cache_root) == after_merge
    with spectra.open_triple(*TOY_REFS) as t:
        subspace = {(x["layer"], x["module"]): x["subspace"] for x in sim["entries"]}
        assert len(subspace) == len(spec["entries"])
        for e in spec["entries"]:
            tau_v, tau_r = t.task_vectors(f"layers.{e['layer']}.{e['module']}.weight")
            s_v, s_r = torch.linalg.svdvals(tau_v.double()), torch.linalg.svdvals(tau_r.double())
            assert e["s_v"] == pytest.approx(s_v[:64].tolist(), rel=1e-6, abs=1e-7 * float(s_v[0]))
            assert e["ratio"] == pytest.approx(float(s_v.sum() / s_r.sum()), rel=1e-6)
            assert subspace[e["layer"], e["module"]] == pytest.approx(linalg.subspace_similarity(tau_v, tau_r, 32, "exact"), rel=1e-6)
    # the other order: analyses first into a fresh cache, then the merge recomputes nothing
    fresh = tmp_path / "fresh"
    spectra.spectra(*TOY_REFS, k=64, method="exact", cache_dir=fresh)
    similarity.similarity(*TOY_REFS, rank=32, method="exact", cache_dir=fresh)
    before = entries(fresh)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGE_LAB_CACHE", str(fresh))
        merge_to_disk(rec, tmp_path / "out2", bar=False)
    assert entries(fresh) == before


def requests_for(mats, alias_prefix="a"):
    return [dc.Request(m, alias=f"{alias_prefix}{i}") for i, m in enumerate(mats)]


def test_an_alias_serves_without_reading_the_matrix(cache_root):
    mats = [torch.randn(50, 20, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    first = dc.decompose_cached(requests_for(mats), 8, "exact")

    def unreadable():
        raise AssertionError("the alias should have served this")

    again = dc.decompose_cached([dc.Request(load=unreadable, alias=f"a{i}") for i in range(3)], 8, "exact")
    for m, a, b in zip(mats, first, again):
        assert torch.equal(a.v, b.v) and a.nuclear == b.nuclear
        assert_close_to_svd(b, m, 8)


def assert_close_to_svd(d, m, k):
    _, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    assert d.nuclear == pytest.approx(float(s.sum()), rel=1e-8)
    torch.testing.assert_close(d.v.double() @ d.v.double().T, vh[:k].T @ vh[:k], rtol=0, atol=1e-5)


def test_a_damaged_entry_is_recomputed_never_trusted(cache_root):
    from safetensors.torch import save_file

    m = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    dc.decompose_cached([dc.Request(m)], 4, "exact")
    (path,) = (cache_root / "decompositions").glob("*/*.safetensors")
    for damage in (lambda p: p.write_bytes(b"\x80\x04garbage"),
                   lambda p: save_file({"s": torch.ones(3, dtype=torch.float64), "vt": torch.ones(4, 30)}, str(p),
                                       metadata={"schema": dc.SCHEMA, "nuclear": "3.0", "exact": "1"})):
        damage(path)
        (d,) = dc.decompose_cached([dc.Request(m)], 4, "exact")
        assert_close_to_svd(d, m, 4)
        assert path.is_file() and len(list((cache_root / "decompositions").glob("*/*.safetensors"))) == 1


def test_randomized_entries_are_keyed_by_k_and_equal_a_fresh_decomposition(cache_root):
    m = torch.randn(200, 150, generator=torch.Generator().manual_seed(4))
    for k in (8, 16, 8):
        (d,) = dc.decompose_cached([dc.Request(m)], k, "lowrank")
        fresh = linalg.decompose(m, k, "lowrank")
        assert not d.exact and torch.equal(d.v, fresh.v) and torch.equal(d.s, fresh.s)
    assert len(entries(cache_root)) == 2


def test_the_folder_stays_under_its_size_bound(tmp_path):
    cache = dc.DecompositionCache(tmp_path / "d", max_bytes=60_000)
    for i in range(8):
        m = torch.randn(100, 60, generator=torch.Generator().manual_seed(i))
        dc.decompose_cached([dc.Request(m)], 8, "exact", cache=cache)
    cache.evict()
    assert sum(p.stat().st_size for p in (tmp_path / "d").glob("*/*.safetensors")) <= 60_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ip_merging_on_cuda_equals_full_svd(cache_root):
    with spectra.open_triple(*TOY_REFS) as t:
        sets = toy_layer_sets(t, 0)
    gpu = {n: TensorSet(n, 0, s.vlm.cuda(), s.reasoner.cuda(), s.base.cuda()) for n, s in sets.items()}
    scores, out = ip_merge(gpu, 32)
    assert all(o.device.type == "cuda" for o in out.values())
    assert_equal_to_reference(sets, 32, scores, {n: o.cpu() for n, o in out.items()})


def _one_tensor_changed(src: Path, dst: Path, name: str) -> None:
    """A copy of the checkpoint `src` whose tensor `name` differs (same shapes, same file size)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (f,) = dst.glob("*.safetensors")
    tensors = load_file(f)
    tensors[name] = tensors[name] * 1.5 + 0.01
    save_file(tensors, f, metadata={"format": "pt"})


def test_two_reasoners_differing_in_one_tensor_never_share_a_decomposition(tmp_path, cache_root):
    """Two fine-tunes of the same size that differ in one tensor: different fingerprints, and an
    ip_merging merge of the second, after the first filled the shared cache, equals its merge from
    an empty cache (a sampled fingerprint once let it reuse the first one's decompositions)."""
    from safetensors.torch import load_file

    from merging import recipe as recipe_mod
    from merging.checkpoint import Checkpoint
    from merging.engine import merge_to_disk

    other = tmp_path / "math-b"
    _one_tensor_changed(TOY_REFS[1], other, "model.layers.0.mlp.up_proj.weight")
    assert (other / "model.safetensors").stat().st_size == (TOY_REFS[1] / "model.safetensors").stat().st_size
    with Checkpoint.open(TOY_REFS[1]) as a, Checkpoint.open(other) as b:
        assert a.fingerprint != b.fingerprint

    def merge(reasoner, out):
        rec = recipe_mod.from_dict({"vlm": str(TOY_REFS[0]), "reasoner": str(reasoner), "base": str(TOY_REFS[2]),
                                    "method": "ip_merging", "parameters": {"threshold": 0.0, "top_fraction": 0.0}})
        merge_to_disk(rec, out, bar=False)
        return load_file(next(out.glob("*.safetensors")))

    merge(TOY_REFS[1], tmp_path / "a")
    shared = merge(other, tmp_path / "b")
    cache_root.rename(tmp_path / "used-cache")  # now an empty cache
    alone = merge(other, tmp_path / "b-alone")
    assert shared.keys() == alone.keys()
    assert all(torch.equal(shared[k], alone[k]) for k in shared)


def test_a_file_rewritten_in_place_is_hashed_again(tmp_path, cache_root):
    import shutil

    from safetensors.torch import load_file, save_file

    from merging.checkpoint import Checkpoint

    folder = tmp_path / "m"
    shutil.copytree(TOY_REFS[2], folder)
    with Checkpoint.open(folder) as ck:
        before = ck.fingerprint
    assert list((cache_root / "file-digests").glob("*.json"))  # remembered
    with Checkpoint.open(folder) as ck:
        assert ck.fingerprint == before
    f = folder / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = -tensors[name]
    save_file(tensors, f, metadata={"format": "pt"})  # same size, new bytes
    with Checkpoint.open(folder) as ck:
        assert ck.fingerprint != before


@pytest.mark.timeout(60)
def test_a_fifo_planted_in_the_cache_is_a_miss_never_a_hang(tmp_path, cache_root):
    """Every small file the caches read (aliases, records, file digests) is opened without blocking and
    read only when regular: a FIFO in its place (which would block a plain open forever) is a miss."""
    import os

    from merging import file_digest

    mats = [torch.randn(30, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    first = dc.decompose_cached(requests_for(mats), 4, "exact")
    aliases = sorted((cache_root / "decompositions" / "aliases").glob("*.json"))
    assert len(aliases) == 2
    for a in aliases:
        a.unlink()
        os.mkfifo(a)
    again = dc.decompose_cached(requests_for(mats), 4, "exact")  # the aliases miss: read the matrices again
    for m, a, b in zip(mats, first, again):
        assert torch.equal(a.v, b.v)
        assert_close_to_svd(b, m, 4)
    cache = dc.DecompositionCache()
    record = cache._record_path("k")
    record.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(record)
    assert cache.record("k") is None
    weights = TOY_REFS[1] / "model.safetensors"
    with open(weights, "rb") as f:
        honest = file_digest.digest(weights, f)
    entry = file_digest._entry(Path(os.path.realpath(weights)))
    entry.unlink()
    os.mkfifo(entry)
    with open(weights, "rb") as f:
        assert file_digest.digest(weights, f) == honest  # hashed again, not read from the FIFO


def test_two_processes_sharing_one_cache_merge_what_each_would_alone(tmp_path, cache_root):
    """Two `merge` processes at once on one empty cache folder (both decompose, both file the same
    entries and aliases): each output equals a merge from a cache of its own, and so does a third run
    served from the shared cache."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.paths import ENV, ROOT

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"vlm: {TOY_REFS[0]}\nreasoner: {TOY_REFS[1]}\nbase: {TOY_REFS[2]}\nmethod: ip_merging\n"
                      "parameters: {rank: 16}\n")

    def start(out, cache):
        env = {**ENV, "MERGE_LAB_CACHE": str(cache)}
        return subprocess.Popen([sys.executable, "-m", "merging", "merge", str(recipe), str(out), "--no-progress"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def weights(out):
        return load_file(next(out.glob("*.safetensors")))

    shared = tmp_path / "shared"
    runs = [start(tmp_path / "a", shared), start(tmp_path / "b", shared), start(tmp_path / "alone", tmp_path / "own")]
    for p in runs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    third = start(tmp_path / "c", shared)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    alone = weights(tmp_path / "alone")
    for out in ("a", "b", "c"):
        got = weights(tmp_path / out)
        assert got.keys() == alone.keys() and all(torch.equal(got[k], alone[k]) for k in got), out
    assert not [p for p in shared.rglob("*.tmp")] and os.listdir(shared / "decompositions" / "aliases")
