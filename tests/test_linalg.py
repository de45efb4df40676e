"""The one decomposition behind IP-Merging and the spectra, against torch.linalg.svd."""

from __future__ import annotations

import math

import pytest
import torch

from merging import linalg, methods, params
from merging.methods import MergeContext, TensorSet


def with_spectrum(rows, cols, s, seed=0):
    """A rows x cols matrix with the given singular values and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T, v


def projector(v):
    return v.double() @ v.double().T


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_exact_decomposition_equals_svd(shape):
    g = torch.Generator().manual_seed(1)
    m = torch.randn(shape, generator=g)
    d = linalg.decompose(m, 6, "exact")
    s_ref = torch.linalg.svdvals(m.double())
    _, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    assert d.exact and d.nuclear == pytest.approx(float(s_ref.sum()), rel=1e-10)
    torch.testing.assert_close(d.s, s_ref[:6], rtol=1e-9, atol=0)
    torch.testing.assert_close(projector(d.v), projector(vh[:6].T), rtol=0, atol=1e-5)


def test_ill_conditioned_nuclear_norm_and_top_basis():
    s = [10.0 ** -e for e in range(0, 10)]  # condition number 1e9
    m, v = with_spectrum(60, 30, s, seed=2)
    d = linalg.decompose(m.float(), 3, "exact")
    ref = float(torch.linalg.svdvals(m.float().double()).sum())  # of the float32 matrix decomposed
    assert d.nuclear == pytest.approx(ref, rel=1e-6) and d.nuclear == pytest.approx(sum(s), rel=1e-5)
    torch.testing.assert_close(projector(d.v), projector(v[:, :3]), rtol=0, atol=1e-4)


def test_large_matrix_nuclear_norm_is_exact_with_the_randomized_basis():
    """1536 x 1536, low-rank tau_v: the auto solver takes the randomized top-k basis, yet the
    nuclear norm is the full one (the old path summed the top 32 singular values only)."""
    n = 1536
    m, v = with_spectrum(n, n, [5.0, 4.0, 3.0, 2.0], seed=3)
    flat = torch.randn(n, n, generator=torch.Generator().manual_seed(4)) * 0.01
    for mat in (m.float(), flat):
        d = linalg.decompose(mat, 32, "auto")
        assert not d.exact
        assert d.nuclear == pytest.approx(float(torch.linalg.svdvals(mat.double()).sum()), rel=1e-6)
    d = linalg.decompose(m.float(), 4, "auto")
    torch.testing.assert_close(projector(d.v), projector(v), rtol=0, atol=1e-4)


def test_ip_merging_rescale_on_a_large_pair_is_the_nuclear_norm_ratio():
    n = 1536
    tau_v, v4 = with_spectrum(n, n, [5.0, 4.0, 3.0, 2.0], seed=5)
    g = torch.Generator().manual_seed(6)
    tau_r = torch.randn(n, n, generator=g, dtype=torch.float64) * 1.5e-4  # flat spectrum
    b = torch.zeros(n, n)  # keeps the task vectors exact in float32
    t = TensorSet("layers.0.mlp.up_proj.weight", 0, (b + tau_v).float(), (b + tau_r).float(), b)
    m = methods.get("ip_merging")
    p = params.resolve(m, {"rank": 4, "threshold": 0.0, "top_fraction": 0.0, "lam": 1.0}, 0, 2)
    out = m.merge_layer(0, {t.name: t}, p, MergeContext(num_layers=2))[t.name]
    tv, tr = t.vlm.double() - b.double(), t.reasoner.double() - b.double()
    lam_n = float(torch.linalg.svdvals(tv).sum() / torch.linalg.svdvals(tr).sum())
    top32 = float(torch.linalg.svdvals(tv)[:32].sum() / torch.linalg.svdvals(tr)[:32].sum())
    assert 1.0 < lam_n < 3.0 and top32 > 10 * lam_n  # the old path's top-32 ratio is far off
    want = t.vlm.double() + lam_n * tr @ projector(v4)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------- similarity
def pair_with_basis(k=4, swap=False, rotate=False, cols=20, seed=7):
    """tau_v, tau_r sharing the same right singular subspace, with known spectra."""
    g = torch.Generator().manual_seed(seed)
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    u_v, _ = torch.linalg.qr(torch.randn(30, k, generator=g, dtype=torch.float64))
    u_r, _ = torch.linalg.qr(torch.randn(30, k, generator=g, dtype=torch.float64))
    s_v = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)[:k]
    s_r = torch.tensor([3.0, 2.0, 1.9999, 0.5], dtype=torch.float64)[:k]  # 2 and 3 nearly equal
    v_r = v.clone()
    if swap:  # the reasoner's near-equal directions come out in the other order
        s_r = torch.tensor([3.0, 2.0001, 2.0, 0.5], dtype=torch.float64)[:k]
        v_r[:, [1, 2]] = v[:, [2, 1]]
    if rotate:  # any rotation inside the subspace
        q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        v_r = v @ q
    return (u_v @ torch.diag(s_v) @ v.T).float(), (u_r @ torch.diag(s_r) @ v_r.T).float(), s_v


def test_paired_similarity_of_aligned_subspaces_is_one_and_drops_on_a_swap():
    tau_v, tau_r, s_v = pair_with_basis()
    assert linalg.subspace_similarity(tau_v, tau_r, 4, "exact") == pytest.approx(1.0, abs=1e-5)
    tau_v, tau_r, s_v = pair_with_basis(swap=True)
    want = float((s_v[0] + s_v[3]) / s_v.sum())  # directions 2 and 3 are now orthogonal in pairing
    assert linalg.subspace_similarity(tau_v, tau_r, 4, "exact") == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("variant", [{}, {"swap": True}, {"rotate": True}])
def test_principal_angle_similarity_is_rotation_invariant(variant):
    tau_v, tau_r, _ = pair_with_basis(**variant)
    assert linalg.subspace_similarity(tau_v, tau_r, 4, "exact", "subspace") == pytest.approx(1.0, abs=1e-5)


def test_principal_angle_similarity_of_a_known_angle():
    """Top-1 subspaces at angle theta: the score is cos(theta) (the paired score is too)."""
    theta = 0.7
    a = torch.zeros(10, 5)
    a[0, 0] = 3.0
    b = torch.zeros(10, 5)
    b[0, 0], b[0, 1] = 2.0 * math.cos(theta), 2.0 * math.sin(theta)
    for kind in linalg.SIMILARITIES:
        assert linalg.subspace_similarity(a, b, 1, "exact", kind) == pytest.approx(math.cos(theta), abs=1e-6)
    with pytest.raises(ValueError, match="similarity must be one of"):
        linalg.subspace_similarity(a, b, 1, "exact", "cosine")


def test_top_fraction_selects_the_most_similar_matrices():
    from merging.methods.ip_merging import select

    scores = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.2}
    assert select(scores, 0.25, 0.0) == ["b", "c"]
    assert select(scores, 0.99, 0.5) == ["b", "c"]
    assert select(scores, 0.99, 0.3) == ["b", "c"]  # ceil(0.3 * 4) = 2
    assert select(scores, 0.0, 1.0) == ["b", "c", "d", "a"]


# --------------------------------------------------------------------------- batched, devices
def ill_conditioned(rows, cols, cond_exp=9, seed=0, zeros=0):
    """rows x cols with singular values 10^0 .. 10^-cond_exp (geometric), then `zeros` exact zeros."""
    n = min(rows, cols)
    s = torch.logspace(0, -cond_exp, n - zeros, dtype=torch.float64).tolist() + [0.0] * zeros
    return with_spectrum(rows, cols, s, seed)[0]


def assert_matches_svd(d, m, k, atol_v=1e-5):
    """d against torch.linalg.svd of the same matrix in float64 (values, nuclear norm, top-k subspace)."""
    _, s_ref, vh = torch.linalg.svd(m.double(), full_matrices=False)
    assert d.exact and d.nuclear == pytest.approx(float(s_ref.sum()), rel=1e-8)
    torch.testing.assert_close(d.s.cpu(), s_ref[:k], rtol=1e-7, atol=1e-9 * float(s_ref[0]))
    torch.testing.assert_close(d.all_s.cpu(), s_ref, rtol=0, atol=1e-7 * float(s_ref[0]))
    torch.testing.assert_close(projector(d.v.cpu()), projector(vh[:k].T), rtol=0, atol=atol_v)


def mixed_batch(device="cpu"):
    g = torch.Generator().manual_seed(11)
    mats = [torch.randn(70, 30, generator=g), torch.randn(30, 70, generator=g),  # tall, wide
            torch.randn(70, 30, generator=g), torch.randn(30, 70, generator=g),  # same shapes: one batch each
            ill_conditioned(70, 30, seed=12).float(), ill_conditioned(30, 70, seed=13).float(),
            ill_conditioned(40, 40, cond_exp=6, seed=14, zeros=5).float(),  # rank-deficient square
            torch.zeros(30, 70)]
    return [m.to(device) for m in mats]


@pytest.mark.parametrize("batch_bytes", [linalg.BATCH_BYTES, 1])  # one call per shape; one per matrix
def test_batched_decompositions_equal_svd_of_each_matrix(monkeypatch, batch_bytes):
    monkeypatch.setattr(linalg, "BATCH_BYTES", batch_bytes)
    mats = mixed_batch()
    for m, d in zip(mats, linalg.decompose_many(mats, 5, "exact")):
        if float(m.abs().max()) == 0:
            assert d.nuclear == 0.0 and float(d.v.abs().max()) == 0.0
            continue
        assert_matches_svd(d, m, 5)
        single = linalg.decompose(m, 5, "exact")
        # batched and single BLAS calls round differently: equal to float64 Gram rounding
        torch.testing.assert_close(single.all_s, d.all_s, rtol=0, atol=1e-8 * float(d.all_s[0]))


def test_ill_conditioned_singular_values_are_accurate_to_float64_gram_rounding():
    """Condition 1e9: through the float64 Gram every singular value is within ~1e-8 of the
    largest (absolute: the square root of the Gram's rounding), those above 1e-4 of it within
    1e-6 relative; the nuclear norm and the top-k subspace stay exact to 1e-8."""
    m = ill_conditioned(300, 120, cond_exp=9, seed=21)
    d = linalg.decompose(m, 8, "exact")
    s_ref = torch.linalg.svdvals(m)
    torch.testing.assert_close(d.all_s, s_ref, rtol=0, atol=3e-8 * float(s_ref[0]))
    big = s_ref > 1e-4 * s_ref[0]
    torch.testing.assert_close(d.all_s[big], s_ref[big], rtol=1e-6, atol=0)
    assert d.nuclear == pytest.approx(float(s_ref.sum()), rel=1e-8)
    assert_matches_svd(d, m, 8, atol_v=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decompositions_on_cuda_equal_svd():
    """The same code on the device: float64 Gram and eigh on CUDA, results on CUDA."""
    mats = mixed_batch("cuda")
    for m, d in zip(mats, linalg.decompose_many(mats, 5, "exact")):
        assert d.v.device.type == "cuda" and d.s.device.type == "cuda"
        if float(m.abs().max()) > 0:
            assert_matches_svd(d, m.cpu(), 5)
    big = torch.randn(1536, 1536, device="cuda") * 0.01
    d = linalg.decompose(big, 32, "auto")
    assert not d.exact and d.nuclear == pytest.approx(float(torch.linalg.svdvals(big.double().cpu()).sum()), rel=1e-8)
