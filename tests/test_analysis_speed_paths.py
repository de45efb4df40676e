"""The analyses' fast path against independent float64 computations.

The spectra and similarity analyses decompose with merging.linalg's "fast" solver (the Gram
eigen-decomposition in float32, falling back to the exact float64 one where its nuclear-norm
bound is too loose), share the blocks' dot products through the decomposition cache's folder and
run on one CPU thread. Every value is checked against torch.linalg.svdvals / svd in float64;
ip_merging must still get exact decompositions from a cache the analyses filled.
"""

from __future__ import annotations

import pytest
import torch

from analysis import similarity, spectra
from merging import decomposition_cache as dc
from merging import linalg
from merging.methods import TensorSet
from merging.methods import ip_merging as ipm
from tests.paths import ROOT

TOY_REFS = tuple(ROOT / "assets" / "toy" / r for r in ("vlm", "math", "base"))


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def with_spectrum(rows: int, cols: int, s: torch.Tensor, seed: int):
    """A float32 rows x cols matrix with singular values s and random singular vectors, and its V."""
    g = torch.Generator().manual_seed(seed)
    n = len(s)
    u, _ = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, n, generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float(), v


def oracle(m: torch.Tensor):
    """float64 singular values and right singular vectors of the float32 matrix itself."""
    _, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return s, vh.T


def projector(v: torch.Tensor) -> torch.Tensor:
    return v.double() @ v.double().T


@pytest.mark.parametrize("shape", [(600, 96), (96, 600), (128, 128)])
def test_fast_solver_matches_float64_on_well_conditioned_matrices(shape):
    n = min(shape)
    # 8 separated leading values over a flat bulk, smallest / largest 0.2 (the synthetic
    # Qwen-shaped task vectors' is 0.4)
    s = torch.cat([torch.linspace(2.0, 1.3, 8), torch.linspace(1.0, 0.4, n - 8)]) * 1e-3
    m, _ = with_spectrum(*shape, s, seed=sum(shape))
    d = linalg.decompose(m, 8, "fast")
    s_ref, v_ref = oracle(m)
    assert not d.exact and d.all_s is not None  # the float32 path itself, not the fallback
    assert d.nuclear == pytest.approx(float(s_ref.sum()), rel=linalg.FAST_NUCLEAR_RTOL)
    assert abs(d.nuclear / float(s_ref.sum()) - 1) < 1e-6  # measured: ~1e-7
    torch.testing.assert_close(d.s, s_ref[:8], rtol=1e-5, atol=0)
    torch.testing.assert_close(d.all_s, s_ref, rtol=0, atol=1e-5 * float(s_ref[0]))
    torch.testing.assert_close(projector(d.v), projector(v_ref[:, :8]), rtol=0, atol=1e-4)
    # the exact solver on the same matrix, for scale: the fast one is within its bound of it
    e = linalg.decompose(m, 8, "exact")
    assert abs(d.nuclear - e.nuclear) <= linalg.FAST_NUCLEAR_RTOL * e.nuclear


@pytest.mark.parametrize("rank", [2, 12])
def test_low_rank_matrices_fall_back_to_the_exact_solver(rank):
    """Squaring in float32 inflates the zero singular values to ~sqrt(eps32) * s_max each; the
    bound sees it and the matrix is decomposed exactly."""
    s = torch.cat([torch.linspace(3.0, 1.0, rank), torch.zeros(80 - rank)])
    m, _ = with_spectrum(400, 80, s, seed=rank)
    g = m.mT @ m
    lam = torch.linalg.eigvalsh(g).flip(-1)
    plain32 = float(lam.double().clamp_min(0).sqrt().sum())
    s_ref, _ = oracle(m)
    assert abs(plain32 / float(s_ref.sum()) - 1) > linalg.FAST_NUCLEAR_RTOL  # float32 alone is off
    assert linalg.float32_nuclear_bound(lam) > linalg.FAST_NUCLEAR_RTOL
    d = linalg.decompose(m, 4, "fast")
    assert d.exact and d.nuclear == pytest.approx(linalg.decompose(m, 4, "exact").nuclear, rel=1e-12)
    # float64 Gram resolution: the float32 matrix's ~1e-8 tail values sit at sqrt(eps64) * s_max
    assert d.nuclear == pytest.approx(float(s_ref.sum()), rel=1e-7)


@pytest.mark.parametrize("kind", ["flat", "power1", "power2", "tiny_tail", "square_random"])
def test_the_float32_bound_covers_the_measured_error(kind):
    n = 96
    i = torch.arange(1, n + 1, dtype=torch.float64)
    if kind == "square_random":
        m = torch.randn(n, n, generator=torch.Generator().manual_seed(7)) * 1e-3
    else:
        s = {"flat": torch.linspace(1.0, 0.5, n), "power1": 1 / i, "power2": 1 / i ** 2,
             "tiny_tail": torch.where(i < 90, 1.0, 1e-6)}[kind]
        m, _ = with_spectrum(500, n, s * 1e-3, seed=3)
    lam = torch.linalg.eigvalsh(m.mT @ m).flip(-1)
    err = abs(float(lam.double().clamp_min(0).sqrt().sum()) / float(oracle(m)[0].sum()) - 1)
    assert err <= linalg.float32_nuclear_bound(lam)


def test_fast_entries_are_never_served_to_exact_requests(cache_root):
    m, _ = with_spectrum(300, 64, torch.linspace(2.0, 0.5, 64), seed=11)
    (fast,) = dc.decompose_cached([dc.Request(m, alias="x")], 8, "fast")
    assert not fast.exact
    names = sorted(p.name.split(".", 1)[1] for p in (cache_root / "decompositions").glob("*/*.safetensors"))
    assert names == [f"{dc.FAST_TAG}.safetensors"]
    (exact,) = dc.decompose_cached([dc.Request(load=lambda: m, alias="x")], 8, "exact")
    ref = linalg.decompose(m, 64, "exact")
    assert exact.exact and exact.nuclear == ref.nuclear and torch.equal(exact.s, ref.s[:8])
    # with an exact entry there, a fast request is served the exact one
    (again,) = dc.decompose_cached([dc.Request(load=lambda: m, alias="x")], 8, "fast")
    assert again.exact and again.nuclear == ref.nuclear


@pytest.fixture(scope="module")
def toy():
    if not (TOY_REFS[0] / "config.json").is_file():
        pytest.skip("the bundled toy family is not here")
    with spectra.open_triple(*TOY_REFS) as t:
        vectors = {c: t.task_vectors(c) for _, _, c in spectra.matrices(t)}
        blocks = {layer: {c: t.task_vectors(c) for c in t.layer_names(layer)} for layer in range(t.num_layers)}
        yield {"vectors": vectors, "blocks": blocks, "fingerprints": t.fingerprints}


def test_toy_spectra_and_similarity_against_float64(toy, cache_root):
    k, rank = 16, 8
    sp = spectra.spectra(*TOY_REFS, k=k, cache_dir=cache_root)
    si = similarity.similarity(*TOY_REFS, rank=rank, cache_dir=cache_root)
    exact_sim = similarity.similarity(*TOY_REFS, rank=rank, method="exact", use_cache=False)
    assert sp["method"] == si["method"] == "fast"
    subspace = {(e["layer"], e["module"]): e["subspace"] for e in si["entries"]}
    subspace_exact = {(e["layer"], e["module"]): e["subspace"] for e in exact_sim["entries"]}
    cos = {(e["layer"], e["module"]): e["cos"] for e in si["entries"]}
    for e in sp["entries"]:
        key = (e["layer"], e["module"])
        tau_v, tau_r = toy["vectors"][f"layers.{e['layer']}.{e['module']}.weight"]
        s_v, s_r = oracle(tau_v)[0], oracle(tau_r)[0]
        assert e["ratio"] == pytest.approx(float(s_v.sum() / s_r.sum()), rel=2 * linalg.FAST_NUCLEAR_RTOL)
        assert e["nuclear_v"] == pytest.approx(float(s_v.sum()), rel=linalg.FAST_NUCLEAR_RTOL)
        assert e["s_v"] == pytest.approx(s_v[:k].tolist(), rel=1e-5, abs=1e-6 * float(s_v[0]))
        assert e["exact"] and set(e["solver"]) <= {"float32", "exact"}
        want_cos = float(tau_v.double().flatten() @ tau_r.double().flatten()
                         / (tau_v.double().norm() * tau_r.double().norm()))
        assert cos[key] == pytest.approx(want_cos, abs=1e-5)
        assert subspace[key] == pytest.approx(subspace_exact[key], abs=1e-4)
    for layer, block in toy["blocks"].items():
        dot = sum(float(a.double().flatten() @ b.double().flatten()) for a, b in block.values())
        vv = sum(float(a.double().pow(2).sum()) for a, _ in block.values())
        rr = sum(float(b.double().pow(2).sum()) for _, b in block.values())
        assert si["block_cos"][layer] == pytest.approx(dot / (vv * rr) ** 0.5, abs=1e-5)


def test_ip_merging_after_the_analyses_gets_exact_decompositions(toy, cache_root):
    spectra.spectra(*TOY_REFS, k=16)  # files fast entries under the triple's aliases
    name = "layers.1.mlp.down_proj.weight"
    with spectra.open_triple(*TOY_REFS) as t:
        w = {role: t.get(role, name) for role in ("vlm", "reasoner", "base")}
    sets = [TensorSet(name, 1, w["vlm"], w["reasoner"], w["base"])]
    dv, dr = ipm.decompositions(sets, 8, "auto", toy["fingerprints"])
    for d, tau in ((dv, w["vlm"] - w["base"]), (dr, w["reasoner"] - w["base"])):
        s_ref = oracle(tau)[0]
        assert d.exact and d.nuclear == pytest.approx(float(s_ref.sum()), rel=1e-10)
        torch.testing.assert_close(d.all_s, linalg.decompose(tau, 8, "exact").all_s, rtol=1e-12, atol=1e-15)


def test_one_thread_restores_the_thread_count_and_progress_keeps_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        with spectra.one_thread("cpu", lambda *a: seen.append(torch.get_num_threads())) as progress:
            assert torch.get_num_threads() == 1
            progress(0, 1, "x")
            assert torch.get_num_threads() == 1
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_matrices_side_by_side_give_the_same_bits_as_one_by_one():
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(200, 48, generator=g) for _ in range(5)] + [torch.randn(48, 200, generator=g)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = linalg.decompose_many(mats, 6, "fast")
        with linalg.side_by_side(2):
            together = linalg.decompose_many(mats, 6, "fast")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(alone, together):
        assert not a.exact and a.nuclear == b.nuclear and torch.equal(a.s, b.s) and torch.equal(a.v, b.v)
