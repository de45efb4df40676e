"""FRANK against its formula written out directly: the norm-weighted mix of both task vectors,
and the attention prior in its clipped and layer-normalised forms."""

from __future__ import annotations

import math

import pytest
import torch

from merging import methods, params
from merging.errors import LabError
from merging.methods import MergeContext, TensorSet
from merging.methods import frank as frank_mod
from merging.recipe import from_dict
from tests.test_methods import L, triple


@pytest.mark.parametrize("knobs", [{}, {"w_v": 0.8}, {"use_prior": 1, "beta": 0.5},
                                   {"use_prior": 1, "beta": 0.5, "prior_form": 1},
                                   {"use_prior": 1, "beta": -0.4, "prior_form": 1}])
def test_frank_formula(knobs):
    sets = {}
    for i, s in enumerate([(8, 8), (8,), (16, 8)]):
        v, r, b = triple(s, seed=i)
        sets[f"layers.2.t{i}"] = TensorSet(f"layers.2.t{i}", 2, v, r, b)
    m = methods.get("frank")
    out = m.merge_layer(2, sets, params.resolve(m, knobs, 2, L), MergeContext(num_layers=L))
    n_v = sum(float(((t.vlm - t.base) ** 2).sum()) for t in sets.values())
    n_r = sum(float(((t.reasoner - t.base) ** 2).sum()) for t in sets.values())
    if knobs.get("prior_form"):  # normalised over the L layers: exp(-beta l) / sum_j exp(-beta j)
        beta = knobs["beta"]
        w_v = math.exp(-beta * 2) / sum(math.exp(-beta * j) for j in range(L))
        w_r = 1 - w_v
    elif knobs.get("use_prior"):
        w_v = math.exp(-0.5 * 2)  # a_2 / a_0 of the decay exp(-beta l)
        w_r = 1 - w_v
    elif "w_v" in knobs:
        w_v, w_r = knobs["w_v"], 1 - knobs["w_v"]
    else:
        w_v = w_r = 1.0  # the paper's "no prior" (our default w_v = 0.5 is the same ratio)
    den = w_v * n_v + w_r * n_r
    for n, t in sets.items():
        want = t.base + w_v * n_v / den * (t.vlm - t.base) + w_r * n_r / den * (t.reasoner - t.base)
        torch.testing.assert_close(out[n], want, rtol=1e-5, atol=1e-6)


def test_frank_prior_is_a_weight_that_falls_with_depth():
    """w_v(l) = a_l / a_0: 1 in the first layer, in [0, 1], falling with depth; flat decay = VLM."""
    w = [frank_mod.prior_w_v(0.1, i) for i in range(32)]
    assert w[0] == 1.0 and all(0.0 <= x <= 1.0 for x in w) and all(x > y for x, y in zip(w, w[1:]))
    assert w[16] == pytest.approx(math.exp(-1.6)) and w[31] == pytest.approx(math.exp(-3.1))
    assert frank_mod.prior(-0.5, 4) == [1.0] * 4  # attention rising with depth: clipped at 1


def test_frank_prior_keeps_the_first_layer_with_the_vlm():
    """Equal task-vector norms: with beta 0.1 layer 0 stays closer to the VLM (in fact is the VLM's) and
    the merge drifts away from the VLM with depth; with a steep decay the last layer leans to the reasoner."""
    m = methods.get("frank")
    g = torch.Generator().manual_seed(5)
    b = torch.randn(16, 16, generator=g)
    tv, tr = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    tr *= tv.norm() / tr.norm()  # equal norms: only the prior decides
    v, r = b + 0.1 * tv, b + 0.1 * tr

    def distances(layer, beta):
        sets = {"x": TensorSet(f"layers.{layer}.x", layer, v, r, b)}
        p = params.resolve(m, {"use_prior": 1, "beta": beta}, layer, L)
        out = m.merge_layer(layer, sets, p, MergeContext(num_layers=L))["x"]
        return float((out - v).norm()), float((out - r).norm())

    d = [distances(layer, 0.1) for layer in range(L)]
    assert d[0][0] < d[0][1] and all(a[0] < b_[0] for a, b_ in zip(d, d[1:])), d
    d_v, d_r = distances(L - 1, 1.0)  # w_v = exp(-3) ~ 0.05
    assert d_r < d_v
    sets = {"x": TensorSet("layers.0.x", 0, v, r, b)}
    out = m.merge_layer(0, sets, params.resolve(m, {"use_prior": 1, "beta": 0.1}, 0, L), MergeContext(num_layers=L))
    torch.testing.assert_close(out["x"], v)  # w_v(0) = 1, so lam_v = 1, lam_r = 0


def test_frank_normalized_prior_sums_to_one_over_the_layers():
    """The layer-normalised form: a distribution over layers (sums to 1), ~1/L in every layer at a
    small beta (0.099 at layer 0 of 32 with beta 0.1), so unlike the clipped form it gives even the
    first block mostly to the reasoner; finite at extreme betas."""
    for beta in (0.1, 1.0, -0.3, 10.0, -10.0):
        w = frank_mod.prior(beta, 32, "normalized")
        assert sum(w) == pytest.approx(1.0) and all(0.0 <= x <= 1.0 for x in w)
    w = frank_mod.prior(0.1, 32, "normalized")
    assert w[0] == pytest.approx((1 - math.exp(-0.1)) / (1 - math.exp(-3.2)))  # geometric sum
    assert w[0] == pytest.approx(0.099, abs=5e-4) and frank_mod.prior(0.1, 32)[0] == 1.0
    assert frank_mod.prior(0.0, 8, "normalized") == pytest.approx([1 / 8] * 8)


def test_frank_names_both_priors_as_leaderboard_variants():
    m = methods.get("frank")
    rows = m.variants(8)
    assert [label for label, _ in rows] == ["prior clipped", "prior normalized"]
    assert [k["prior_form"] for _, k in rows] == [0, 1] and all(k["use_prior"] == 1 for _, k in rows)
    for _, knobs in rows:
        from_dict({"vlm": "a", "reasoner": "b", "base": "c", "method": "frank", "parameters": knobs})
    got = from_dict({"vlm": "a", "reasoner": "b", "base": "c", "method": "frank",
                     "parameters": {"use_prior": 1, "prior_form": "normalized"}})
    assert got.parameters["prior_form"] == 1
    with pytest.raises(LabError, match="'prior_form' shapes the prior of 'use_prior: 1'"):
        from_dict({"vlm": "a", "reasoner": "b", "base": "c", "method": "frank", "parameters": {"prior_form": 1}})


def test_frank_rejects_both_priors():
    with pytest.raises(LabError, match="not both"):
        from_dict({"vlm": "a", "reasoner": "b", "base": "c", "method": "frank",
                   "parameters": {"w_v": [0.5, 0.4], "use_prior": True}})
