"""Each method against its formula written out directly, on small tensors (no checkpoints)."""

from __future__ import annotations

import math

import pytest
import torch

from merging import chance_similarity, linalg, methods, params
from merging.errors import LabError
from merging.methods import MergeContext, TensorSet
from merging.methods import gta as gta_mod

L = 4


def triple(shape=(24, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b + 0.1 * torch.randn(shape, generator=g), b + 0.1 * torch.randn(shape, generator=g), b


def run(name, v, r, b, layer=1, ctx=None, **knobs):
    m = methods.get(name)
    p = params.resolve(m, knobs, layer, L)
    ctx = ctx or MergeContext(seed=0, num_layers=L)
    return m.merge_tensor(TensorSet("layers.1.mlp.up_proj.weight", layer, v, r, b), p, ctx)


# --- mergekit's generalized task arithmetic, written loop-free on stacked tensors -----------------
def ref_l1_rescale(tensor, mask, eps=1e-7):
    """mergekit's sparsify.rescaled_masked_tensor with norm l1 (what `rescale: true` does today),
    transcribed: mask, then scale so the L1 norm is the unmasked tensor's (unless either is ~0)."""
    masked = tensor * mask
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def ref_gta(v, r, b, w_v, w_r, density, lam, normalize, consensus, masks=None, rescale="l1"):
    """Reference: mergekit generalized_task_arithmetic (sparsify -> weight -> consensus -> normalize);
    DARE (masks given) rescaled as mergekit does (l1) or as the DARE paper does (inverse_density)."""
    deltas = torch.stack([v - b, r - b])
    if masks is None:  # magnitude: top int(density*numel) by |value|, per model, no rescale
        k = int(density * v.numel())
        flat = deltas.abs().reshape(2, -1)
        order = torch.argsort(flat, dim=1, descending=True)
        keep = torch.zeros_like(flat).scatter_(1, order[:, :k], 1.0)
        deltas = deltas * keep.view_as(deltas)
    elif rescale == "l1":  # DARE with given keep-masks, each task vector keeping its L1 norm
        deltas = torch.stack([ref_l1_rescale(d, m) for d, m in zip(deltas, masks)])
    else:  # DARE with given keep-masks, survivors divided by density
        deltas = deltas * masks / density
    weights = torch.tensor([w_v, w_r]).view(2, *([1] * v.dim()))
    wd = deltas * weights
    if consensus:
        majority = (wd.sum(0) >= 0).float() * 2 - 1
        mask = (wd.sign() == majority).float()
        mixed = (wd * mask).sum(0)
        divisor = (weights * mask).sum(0)
    else:
        mixed = wd.sum(0)
        divisor = weights.sum(0).expand_as(mixed).clone()
    divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return b + mixed * lam


def test_linear_and_task_arithmetic_formulas():
    v, r, b = triple()
    torch.testing.assert_close(run("linear", v, r, b, alpha=0.3), 0.7 * v + 0.3 * r)
    torch.testing.assert_close(run("task_arithmetic", v, r, b, alpha=0.7), v + 0.7 * (r - b))
    assert torch.equal(run("linear", v, r, b, alpha=0.0), v)
    assert torch.equal(run("linear", v, r, b, alpha=1.0), r)
    assert torch.equal(run("task_arithmetic", v, r, b, alpha=0.0), v)


@pytest.mark.parametrize("w_v,w_r,density,lam,normalize", [
    (1.0, 1.0, 0.5, 1.0, 1), (1.0, 0.4, 0.3, 1.0, 1), (0.7, 1.3, 0.8, 0.6, 0), (1.0, 0.5, 1.0, 1.0, 1)])
def test_ties_equals_mergekit_semantics(w_v, w_r, density, lam, normalize):
    v, r, b = triple()
    got = run("ties", v, r, b, weight_vlm=w_v, alpha=w_r, density=density, normalize=normalize, lam=lam)
    want = ref_gta(v, r, b, w_v, w_r, density, lam, normalize, consensus=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def fixed_dare_masks(monkeypatch, keep):
    """Make DARE draw these keep-masks, in order (the VLM's, then the reasoner's)."""
    draws, real = iter(keep), torch.rand

    def fake_rand(shape, generator=None, device=None):
        return torch.where(next(draws), 0.0, 1.0) if generator is not None else real(shape)

    monkeypatch.setattr(gta_mod.torch, "rand", fake_rand)


@pytest.mark.parametrize("name,consensus,normalize", [("dare_ties", True, 1), ("dare_ties", True, 0),
                                                      ("dare_linear", False, 0), ("dare_linear", False, 1)])
@pytest.mark.parametrize("rescale", ["l1", "inverse_density"])
def test_dare_with_fixed_masks_equals_mergekit_semantics(monkeypatch, name, consensus, normalize, rescale):
    """Our DARE against the transcription of mergekit's sparsify + GTA above, both on the same masks:
    the default rescale is mergekit's L1; `rescale: inverse_density` is the paper's 1/density."""
    v, r, b = triple()
    keep = torch.rand((2, *v.shape), generator=torch.Generator().manual_seed(7)) < 0.4
    fixed_dare_masks(monkeypatch, keep)
    knobs = {} if rescale == "l1" else {"rescale": 1}
    got = run(name, v, r, b, weight_vlm=0.8, alpha=1.2, density=0.4, normalize=normalize, lam=0.9, **knobs)
    monkeypatch.undo()
    want = ref_gta(v, r, b, 0.8, 1.2, 0.4, 0.9, normalize, consensus, masks=keep.float(), rescale=rescale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    other = ref_gta(v, r, b, 0.8, 1.2, 0.4, 0.9, normalize, consensus, masks=keep.float(),
                    rescale="inverse_density" if rescale == "l1" else "l1")
    assert (got - other).abs().max() > 1e-4  # the two rescales differ on these masks


def test_dare_l1_rescale_keeps_each_task_vectors_l1_norm():
    """Mask-independent: with the reasoner at weight 0, dare_linear's update is the VLM's sparsified
    task vector, whose L1 norm is the whole task vector's (mergekit); 1/density only on average."""
    v, r, b = triple((96, 64), seed=4)
    for seed in (0, 1, 2):
        ctx = MergeContext(seed=seed, num_layers=L)
        out = run("dare_linear", v, r, b, ctx=ctx, weight_vlm=1.0, alpha=0.0, density=0.3).double() - b.double()
        assert float((out != 0).double().mean()) == pytest.approx(0.3, abs=0.02)
        assert float(out.abs().sum()) == pytest.approx(float((v - b).double().abs().sum()), rel=1e-5)
    paper = run("dare_linear", v, r, b, weight_vlm=1.0, alpha=0.0, density=0.3, rescale=1).double() - b.double()
    assert float(paper.abs().sum()) != pytest.approx(float((v - b).double().abs().sum()), rel=1e-4)
    none = run("dare_linear", v, r, b, weight_vlm=1.0, alpha=0.0, density=0.3, rescale=2).double() - b.double()
    kept = none != 0
    torch.testing.assert_close(none[kept], (v - b).double()[kept], rtol=0, atol=1e-6)  # survivors as they were


def test_defaults_follow_mergekit_for_shared_names():
    """mergekit's registry: normalize on for ties, off for dare_ties and dare_linear; lambda 1."""
    want = {"ties": 1, "dare_ties": 0, "dare_linear": 0}
    for name, normalize in want.items():
        d = methods.get(name).defaults()
        assert d["normalize"] == normalize and d["lam"] == 1.0 and d["br2v"] == 0, name


def test_dare_ties_defaults_at_density_one_equal_mergekit():
    v, r, b = triple()
    got = run("dare_ties", v, r, b, density=1.0)
    want = ref_gta(v, r, b, 1.0, 1.0, 1.0, 1.0, normalize=0, consensus=True, masks=torch.ones(2, *v.shape))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def ref_br2v(v, r, b, w_v, w_r, consensus, keep=None):
    """BR2V's reference code written out: sign on unweighted task vectors, divide by the count of
    agreeing models (at least 1), no DARE rescale; keep: given keep-masks (DARE) or None (top-k)."""
    taus = torch.stack([v - b, r - b])
    if keep is not None:
        taus = taus * keep
    weighted = taus * torch.tensor([w_v, w_r]).view(2, *([1] * v.dim()))
    if not consensus:
        return b + weighted.sum(0)
    agree = taus.sign() == torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    return b + (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_ties_br2v_semantics():
    v, r, b = triple()
    got = run("ties", v, r, b, weight_vlm=1.6, alpha=0.2, density=1.0, br2v=1)
    torch.testing.assert_close(got, ref_br2v(v, r, b, 1.6, 0.2, True), rtol=0, atol=1e-6)
    assert (got - run("ties", v, r, b, weight_vlm=1.6, alpha=0.2, density=1.0)).abs().max() > 1e-3


@pytest.mark.parametrize("name,consensus", [("dare_ties", True), ("dare_linear", False)])
def test_dare_br2v_semantics(monkeypatch, name, consensus):
    v, r, b = triple()
    keep = (torch.rand((2, *v.shape), generator=torch.Generator().manual_seed(3)) < 0.2)
    fixed_dare_masks(monkeypatch, keep)
    got = run(name, v, r, b, weight_vlm=1.6, alpha=0.2, density=0.2, br2v=1)
    monkeypatch.undo()
    torch.testing.assert_close(got, ref_br2v(v, r, b, 1.6, 0.2, consensus, keep.float()), rtol=0, atol=1e-6)


def test_dare_statistics_and_seeding():
    tau = torch.ones(400, 400)
    out = gta_mod.bernoulli(tau, 0.3, MergeContext(seed=1).generator("x", "cpu"), "inverse_density")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # drop rate 1 - density
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))  # survivors rescaled
    assert abs(out.mean().item() - 1.0) < 0.03  # unbiased: E[dare(tau)] = tau
    v, r, b = triple((64, 64))
    c = [MergeContext(seed=s, num_layers=L) for s in (0, 0, 1)]
    a1, a2, a3 = (run("dare_ties", v, r, b, ctx=x, density=0.5) for x in c)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_ties_density_one_alpha_zero_gives_vlm():
    v, r, b = triple()
    torch.testing.assert_close(run("ties", v, r, b, alpha=0.0, density=1.0), v, rtol=0, atol=1e-6)


def test_layer_swap_rule():
    v, r, b = triple()
    m = methods.get("layer_swap")
    ctx = MergeContext(num_layers=L)
    for layer, kept in [(0, True), (1, True), (2, False), (None, False)]:
        p = params.resolve(m, {"alpha": 0.5}, layer, L)  # the default base_layer_num -2: first half (0, 1) kept
        out = m.merge_tensor(TensorSet("n", layer, v, r, b), p, ctx)
        assert torch.equal(out, v) if kept else torch.allclose(out, 0.5 * v + 0.5 * r)
    p = params.resolve(m, {"alpha": 0.5, "base_layer_num": 2}, 2, L)
    assert torch.equal(m.merge_tensor(TensorSet("n", 2, v, r, b), p, ctx), v)


def test_layer_swap_minus_one_keeps_no_layer_as_in_the_br2v_code():
    """BR2V's merge.py keeps a tensor only when its layer number <= base_layer_num, so at its
    default -1 every layer (and the final norm) is merged: with alpha 1, the reasoner's."""
    v, r, b = triple()
    m = methods.get("layer_swap")
    ctx = MergeContext(num_layers=L)
    for layer in (0, 1, L - 1, None):
        for alpha in (1.0, 0.1):
            p = params.resolve(m, {"alpha": alpha, "base_layer_num": -1}, layer, L)
            out = m.merge_tensor(TensorSet("n", layer, v, r, b), p, ctx)
            torch.testing.assert_close(out, (1 - alpha) * v + alpha * r, rtol=0, atol=1e-6)
        assert torch.equal(m.merge_tensor(TensorSet("n", layer, v, r, b),
                                          params.resolve(m, {"base_layer_num": -1}, layer, L), ctx), r)


def _svd_ref(tau_v, tau_r, k):
    _, s_v, vh_v = torch.linalg.svd(tau_v, full_matrices=False)
    _, s_r, vh_r = torch.linalg.svd(tau_r, full_matrices=False)
    sim = float((s_v[:k] * (vh_v[:k] * vh_r[:k]).sum(1).abs()).sum() / s_v[:k].sum())
    return sim, float(s_v.sum() / s_r.sum()), vh_v[:k].T


def test_ip_merging_formula_and_selection():
    shapes = {"self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16), "mlp.down_proj.weight": (16, 24)}
    sets = {}
    for i, (n, s) in enumerate(shapes.items()):
        v, r, b = triple(s, seed=i)
        sets[f"layers.1.{n}"] = TensorSet(f"layers.1.{n}", 1, v, r, b)
    norm = triple((16,), seed=9)
    sets["layers.1.input_layernorm.weight"] = TensorSet("layers.1.input_layernorm.weight", 1, *norm)
    m = methods.get("ip_merging")
    k, lam, temp = 4, 0.7, 0.5
    ref = {n: _svd_ref(t.vlm - t.base, t.reasoner - t.base, k) for n, t in sets.items() if t.vlm.dim() == 2}
    for n, t in sets.items():  # the one similarity function is the formula
        if t.vlm.dim() == 2:
            assert math.isclose(linalg.subspace_similarity(t.vlm - t.base, t.reasoner - t.base, k, "exact"),
                                ref[n][0], rel_tol=1e-5)
    # A threshold halfway between two scores, never equal to one: the reference and the code
    # compute the scores in different precisions, so a score at the threshold may land either side.
    lo, hi = sorted(x[0] for x in ref.values())[:2]
    assert hi - lo > 1e-3
    thr = (lo + hi) / 2  # selects the two most similar matrices
    p = params.resolve(m, {"rank": k, "lam": lam, "temperature": temp, "threshold": thr, "use_threshold": 1}, 1, L)
    out = m.merge_layer(1, sets, p, MergeContext(num_layers=L))
    chosen = [n for n, x in ref.items() if x[0] >= thr]
    assert sorted(out) == sorted(chosen) and len(chosen) == 2
    gamma = torch.softmax(torch.tensor([ref[n][0] for n in chosen]) / temp, 0) * len(chosen)
    for gm, n in zip(gamma, chosen):
        t = sets[n]
        _, lam_n, vk = ref[n]
        want = t.vlm + lam * gm * (lam_n * (t.reasoner - t.base)) @ vk @ vk.T
        torch.testing.assert_close(out[n], want, rtol=1e-4, atol=1e-5)
    assert m.merge_layer(None, sets, p, MergeContext(num_layers=L)) == {}
    p0 = params.resolve(m, {"lam": 0.0, "threshold": 0.0, "top_fraction": 0.0}, 1, L)  # the older spelling
    ctx = MergeContext(num_layers=L)
    assert all(torch.equal(x, sets[n].vlm) for n, x in m.merge_layer(1, sets, p0, ctx).items())
    recorded = ctx.diagnostics.methods["ip_merging"][1]
    assert recorded["rule"] == "threshold" and len(recorded["selected"]) == 3


@pytest.mark.parametrize("kind", ["paired", "subspace"])
def test_chance_level_is_what_unrelated_task_vectors_score(kind):
    """merging.chance_similarity against the lab's own similarity of independent Gaussian task
    vectors (their singular vectors are uniformly random), averaged over many draws."""
    g = torch.Generator().manual_seed(11)
    rows, d, k = 40, 48, 8
    got = [linalg.similarity(linalg.decompose(torch.randn(rows, d, generator=g), k, "exact"),
                             linalg.decompose(torch.randn(rows, d, generator=g), k, "exact"), kind) for _ in range(60)]
    assert chance_similarity.chance(d, k, kind) == pytest.approx(sum(got) / len(got), abs=0.015)
    assert chance_similarity.paired_chance(128) == pytest.approx(math.sqrt(2 / (math.pi * 128)), rel=0.01)  # ~0.07


def test_ip_merging_warns_only_when_scores_sit_near_chance():
    """Independent task vectors score ~1x chance (warned); a reasoner whose task vector shares the
    VLM's directions scores many times chance (not warned). The rule: median score / chance < 3."""
    m = methods.get("ip_merging")
    g = torch.Generator().manual_seed(5)

    def warnings(shared):
        sets = {}
        for n in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight"):
            b = torch.randn(64, 48, generator=g)
            tau_v = torch.randn(64, 48, generator=g)
            tau_r = tau_v + 0.3 * torch.randn(64, 48, generator=g) if shared else torch.randn(64, 48, generator=g)
            sets[f"layers.1.{n}"] = TensorSet(f"layers.1.{n}", 1, b + tau_v, b + tau_r, b)
        ctx = MergeContext(num_layers=L)
        m.merge_layer(1, sets, params.resolve(m, {"rank": 8}, 1, L), ctx)
        return m.summarize_diagnostics(ctx.diagnostics.as_dict())

    (diag, warn) = warnings(shared=False)
    assert diag["ip_merging"]["chance"]["median_ratio"] < 1.5 and len(warn) == 1 and "near chance" in warn[0]
    (diag, warn) = warnings(shared=True)
    assert diag["ip_merging"]["chance"]["median_ratio"] > 3 and warn == []


def test_params_resolution():
    m = methods.get("task_arithmetic")
    assert params.resolve(m, {"alpha": 0.3}, 2, L)["alpha"] == 0.3
    assert params.resolve(m, {"alpha": [0.1, 0.2, 0.3, 0.4]}, 2, L)["alpha"] == 0.3
    assert params.resolve(m, {"alpha": [0.1, 0.2, 0.3, 0.4]}, None, L)["alpha"] == 0.4  # non-layer: last
    grad = [params.resolve(m, {"alpha": [0.0, 0.9]}, i, L)["alpha"] for i in range(L)]
    assert grad == pytest.approx([0.0, 0.3, 0.6, 0.9])
    grad3 = [params.resolve(m, {"alpha": [0.0, 1.0, 0.0]}, i, 5)["alpha"] for i in range(5)]
    assert grad3 == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    ip = methods.get("ip_merging")
    assert params.resolve(ip, {"rank": [4, 9]}, 1, L)["rank"] == 6.0  # integer knobs stay whole
    for bad in ([0.1], [0.1] * 5):
        with pytest.raises(LabError, match=rf"'alpha' is a list of length {len(bad)}.*4 layers"):
            params.resolve(m, {"alpha": bad}, 0, L)


def test_ties_lambda_is_read_as_lam_and_both_names_refused(tmp_path):
    from merging.errors import LabError
    from merging.recipe import from_dict

    d = {"vlm": "v", "reasoner": "r", "base": "b", "method": "ties"}
    old = from_dict({**d, "parameters": {"lambda": 0.7}})
    assert old.parameters == {"lam": 0.7} == from_dict({**d, "parameters": {"lam": 0.7}}).parameters
    with pytest.raises(LabError, match="'lam' given twice.*'lambda'"):
        from_dict({**d, "parameters": {"lambda": 0.7, "lam": 0.5}})


def test_rule_knobs_take_their_names_in_recipes():
    from merging.recipe import from_dict

    base = {"vlm": "a", "reasoner": "b", "base": "c", "method": "dare_linear"}
    for name, number in (("l1", 0), ("inverse_density", 1), ("none", 2)):
        assert from_dict({**base, "parameters": {"rescale": name}}).parameters == {"rescale": number}
    assert from_dict({**base, "parameters": {"rescale": 1}}).parameters == {"rescale": 1}
    with pytest.raises(LabError, match=r"^parameter 'rescale' must be one of l1, inverse_density, none .*'l2'"):
        from_dict({**base, "parameters": {"rescale": "l2"}})
    with pytest.raises(LabError, match="unknown parameter 'rescale'"):
        from_dict({**base, "method": "ties", "parameters": {"rescale": "l1"}})  # TIES does not rescale
