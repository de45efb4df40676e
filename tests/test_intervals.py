"""analysis.intervals against independent values: the Wilson bounds Newcombe (1998) publishes and the
roots of the score test's quadratic; the paired bootstrap against its exact distribution, enumerated."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from analysis import intervals

# Newcombe, "Two-sided confidence intervals for the single proportion", Stat. Med. 17 (1998), Table II,
# method 3 (Wilson score, no continuity correction), 4 decimals as printed there.
NEWCOMBE = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
            (1, 29): (0.0061, 0.1718)}


@pytest.mark.parametrize("k,n", sorted(NEWCOMBE))
def test_wilson_matches_newcombes_published_bounds(k, n):
    lo, hi = intervals.wilson(k, n)
    assert (round(lo, 4), round(hi, 4)) == NEWCOMBE[(k, n)]


@pytest.mark.parametrize("k,n", [(0, 8), (1, 8), (4, 8), (8, 8), (119, 150), (5, 150), (150, 150), (37, 40)])
def test_wilson_bounds_are_the_roots_of_the_score_tests_quadratic(k, n):
    """The Wilson bounds are the p with (k/n - p)^2 = z^2 p (1 - p) / n:
    (n + z^2) p^2 - (2k + z^2) p + k^2 / n = 0, solved here with the quadratic formula."""
    z = 1.959963984540054
    a, b, c = n + z * z, -(2 * k + z * z), k * k / n
    disc = math.sqrt(b * b - 4 * a * c)
    want = ((-b - disc) / (2 * a), (-b + disc) / (2 * a))
    got = intervals.wilson(k, n)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.0 <= got[0] <= k / n <= got[1] <= 1.0


def test_wilson_refuses_impossible_counts_and_knows_nothing_of_zero_items():
    with pytest.raises(ValueError, match="k=9, n=8"):
        intervals.wilson(9, 8)
    assert intervals.wilson(0, 0) == (0.0, 1.0)
    iv = intervals.accuracy([True, False, True, True])
    assert (iv["k"], iv["n"]) == (3, 4) and iv["acc"] == pytest.approx(0.75)


def _exact_bootstrap_cdf(d: list[int]) -> dict[float, float]:
    """P(resampled mean of d <= x) over all n^n equally likely index tuples."""
    n = len(d)
    counts: dict[float, int] = {}
    for idx in itertools.product(range(n), repeat=n):
        m = sum(d[i] for i in idx) / n
        counts[m] = counts.get(m, 0) + 1
    total, run, cdf = n ** n, 0, {}
    for m in sorted(counts):
        run += counts[m]
        cdf[m] = run / total
    return cdf


def test_the_paired_bootstrap_follows_its_exact_distribution_on_a_tiny_case():
    a = [True, True, False, False, True]
    b = [True, False, True, True, True]  # differences +0, -1, +1, +1, +0
    d = [int(y) - int(x) for x, y in zip(a, b)]
    exact = _exact_bootstrap_cdf(d)
    draws = intervals.bootstrap_diffs(a, b, resamples=20000, seed=3)
    for x, p in exact.items():  # the empirical CDF at each support point, within sampling error
        got = sum(v <= x + 1e-9 for v in draws) / len(draws)
        assert got == pytest.approx(p, abs=0.015), x


def test_identical_models_are_noise_and_a_clear_gain_is_not():
    same = [True] * 30 + [False] * 20
    iv = intervals.paired_difference(same, same)
    assert iv["diff"] == 0 and iv["lo"] == 0 and iv["hi"] == 0 and iv["noise"]
    gain = intervals.paired_difference([False] * 40, [True] * 40)
    assert gain["diff"] == pytest.approx(1.0) and gain["lo"] == pytest.approx(1.0) and not gain["noise"]
    small = intervals.paired_difference([False] * 150, [True] * 3 + [False] * 147)  # +2 points, 3 of 150
    assert small["lo"] == pytest.approx(0.0, abs=1e-12) and small["noise"]  # 0.0 when none of the 3 is drawn
    assert intervals.fmt_diff(small).endswith("within noise")
    with pytest.raises(ValueError, match="not the same items"):
        intervals.paired_difference([True], [True, False])


def test_the_paired_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Two correlated models on n = 100 items drawn from a known population (true difference +0.10)."""
    rng, hits, trials = random.Random(7), 0, 300
    for t in range(trials):
        a, b = [], []
        for _ in range(100):
            u = rng.random()  # P(a right) = 0.6, P(b right) = 0.7, mostly the same items
            a.append(u < 0.6)
            b.append(u < 0.65 or 0.9 < u < 0.95)
        iv = intervals.paired_difference(a, b, resamples=400, seed=t)
        hits += iv["lo"] <= 0.10 <= iv["hi"]
    assert 0.90 <= hits / trials <= 0.99


def test_the_wilson_interval_covers_about_95_percent_of_the_time():
    rng, p, n = random.Random(11), 0.8, 150
    hits = 0
    for _ in range(2000):
        k = sum(rng.random() < p for _ in range(n))
        lo, hi = intervals.wilson(k, n)
        hits += lo <= p <= hi
    assert 0.93 <= hits / 2000 <= 0.97


def test_formats():
    iv = intervals.accuracy([True] * 93 + [False] * 57)
    assert intervals.fmt_acc(iv) == "0.62 [0.54, 0.69]"  # Wilson: 0.5402, 0.6938
    assert intervals.fmt_acc(iv, percent=True).startswith("62.0% [")
    diff = {"diff": 0.04, "lo": -0.027, "hi": 0.107, "noise": True}
    assert intervals.fmt_diff(diff) == "+4.0 [-2.7, +10.7] within noise"
