"""Eq. 1 / Eq. 2 against the paper's formulas written out here, their numerics at extreme ratios,
largest-remainder rounding (randomised properties and a brute-force optimum), and the bounds."""

import itertools
import math

import numpy as np
import pytest

from megatron_ddk.ddk import (
    apply_floor_cap,
    apply_repetition_cap,
    bound_weights,
    discrepancy_factor,
    discrepancy_factor_from_losses,
    largest_remainder_counts,
    smooth_update,
    smooth_update_from_losses,
)


def eq1_reference(ppl_s, ppl_t):
    """r[i] = exp(ppl_S[i]/ppl_T[i]) / sum_j exp(ppl_S[j]/ppl_T[j]) (paper, Eq. 1)."""
    e = [math.exp(s / t) for s, t in zip(ppl_s, ppl_t)]
    return [x / sum(e) for x in e]


def eq2_reference(r, ppl_s, ppl_t, alpha):
    """psi = r * exp(ppl_S/ppl_T); r' = alpha * psi / sum(psi) + (1 - alpha) / N (Eq. 2)."""
    psi = [ri * math.exp(s / t) for ri, s, t in zip(r, ppl_s, ppl_t)]
    return [alpha * p / sum(psi) + (1 - alpha) / len(r) for p in psi]


def _random_case(rng, n):
    ppl_t = rng.uniform(2.0, 40.0, n)
    ppl_s = ppl_t * rng.uniform(1.0, 6.0, n)
    r = rng.dirichlet(np.ones(n))
    return r, ppl_s, ppl_t


def test_eq1_and_eq2_match_the_paper():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        r, ps, pt = _random_case(rng, n)
        alpha = float(rng.uniform(0, 1))
        np.testing.assert_allclose(discrepancy_factor(ps, pt), eq1_reference(ps, pt), rtol=1e-12)
        np.testing.assert_allclose(smooth_update(r, ps, pt, alpha),
                                   eq2_reference(r, ps, pt, alpha), rtol=1e-12)
        # Same through mean CE losses: ppl = exp(loss).
        ls, lt = np.log(ps), np.log(pt)
        np.testing.assert_allclose(discrepancy_factor_from_losses(ls, lt),
                                   eq1_reference(ps, pt), rtol=1e-10)
        np.testing.assert_allclose(smooth_update_from_losses(r, ls, lt, alpha),
                                   eq2_reference(r, ps, pt, alpha), rtol=1e-10)


def test_weights_sum_to_one_and_keep_the_uniform_floor():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        r, ps, pt = _random_case(rng, n)
        alpha = float(rng.uniform(0, 1))
        w1, w2 = discrepancy_factor(ps, pt), smooth_update(r, ps, pt, alpha)
        assert abs(w1.sum() - 1) < 1e-12 and abs(w2.sum() - 1) < 1e-12
        assert np.all(w2 >= (1 - alpha) / n - 1e-15)


@pytest.mark.parametrize("big", [1e2, 1e4, 1e6, 1e300])
def test_finite_for_huge_ratios(big):
    ps, pt = np.array([big, big - 1.0, 3.0, 1.0]), np.ones(4)
    w1 = discrepancy_factor(ps, pt)
    w2 = smooth_update(np.full(4, 0.25), ps, pt, 0.5)
    assert np.all(np.isfinite(w1)) and np.all(np.isfinite(w2))
    assert abs(w1.sum() - 1) < 1e-12 and abs(w2.sum() - 1) < 1e-12
    if big <= 1e6:  # exact known answer: softmax of (x, x - 1, ~0, ~0)
        p = 1 / (1 + math.exp(-1))
        np.testing.assert_allclose(w1[:2], [p, 1 - p], rtol=1e-12)
        np.testing.assert_allclose(w2, [0.5 * p + 0.125, 0.5 * (1 - p) + 0.125, 0.125, 0.125],
                                   rtol=1e-12)
    # The same ratio through losses: loss_S - loss_T = log(ratio), even beyond exp's range.
    ls = np.log(ps) + np.array([0.0, 0.0, 0.0, 800.0])
    w3 = smooth_update_from_losses(np.full(4, 0.25), ls, np.zeros(4))
    assert np.all(np.isfinite(w3)) and abs(w3.sum() - 1) < 1e-12 and w3.min() >= 0.125 - 1e-15


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        discrepancy_factor_from_losses([1.0, float("nan")], [1.0, 1.0])
    with pytest.raises(ValueError, match="differ in length"):
        discrepancy_factor([2.0, 3.0], [1.0])
    with pytest.raises(ValueError, match="> 0"):
        discrepancy_factor([2.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        smooth_update([0.5, 0.5], [2.0, 3.0], [1.0, 1.0], alpha=1.5)


def test_largest_remainder_randomised_properties():
    rng = np.random.default_rng(2)
    for _ in range(2000):
        n = int(rng.integers(1, 15))
        w = rng.dirichlet(np.full(n, float(rng.choice([0.1, 1.0, 10.0]))))
        w[rng.random(n) < 0.3] = 0.0
        if w.sum() == 0:
            w[int(rng.integers(n))] = 1.0
        w = w * float(rng.choice([1.0, 1e-9, 37.0]))  # unnormalised weights are fine
        total = int(rng.choice([0, 1, 7, 128, 128000, int(rng.integers(0, 10**7))]))
        c = largest_remainder_counts(w, total)
        share = w / w.sum() * total
        assert c.dtype == np.int64 and c.sum() == total
        assert np.all(np.abs(c - share) < 1 + 1e-6)
        assert np.all(c[w == 0] == 0) and np.all(c >= 0)
        # Hamilton: only domains whose remainder is among the largest got the extra sample.
        frac = share - np.floor(share)
        up = c > np.floor(share + 1e-9)
        if up.any() and (~up & (w > 0)).any():
            assert frac[up].min() >= frac[~up & (w > 0)].max() - 1e-6


def test_largest_remainder_is_the_l1_optimum_on_small_cases():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n, total = int(rng.integers(1, 4)), int(rng.integers(0, 9))
        w = rng.dirichlet(np.ones(n))
        share = w * total
        best = min(sum(abs(a - s) for a, s in zip(comp, share))
                   for comp in itertools.product(range(total + 1), repeat=n)
                   if sum(comp) == total)
        c = largest_remainder_counts(w, total)
        assert np.abs(c - share).sum() <= best + 1e-9


def test_largest_remainder_known_answers():
    assert largest_remainder_counts([1, 1, 2], 8).tolist() == [2, 2, 4]
    assert largest_remainder_counts([1, 1, 1], 4).tolist() == [2, 1, 1]  # tie: lower index
    assert largest_remainder_counts([0.3, 0.7], 10).tolist() == [3, 7]
    assert largest_remainder_counts([0.0, 1.0], 5).tolist() == [0, 5]
    with pytest.raises(ValueError):
        largest_remainder_counts([0.0, 0.0], 5)


def test_floor_cap_known_answer_and_properties():
    np.testing.assert_allclose(apply_floor_cap([0.9, 0.05, 0.05], 0.1, 0.5), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(apply_floor_cap([0.6, 0.3, 0.1, 0.0], 0.2, 0.5),
                               [0.5, 0.3, 0.2, 0.0])
    rng = np.random.default_rng(4)
    for _ in range(500):
        n = int(rng.integers(1, 10))
        w = rng.dirichlet(np.full(n, 0.5)) + 1e-12
        floor = float(rng.uniform(0, 1 / n))
        cap = float(rng.uniform(1 / n, 1))
        out = apply_floor_cap(w, floor, cap)
        assert abs(out.sum() - 1) < 1e-12
        assert np.all(out >= floor - 1e-12) and np.all(out <= cap + 1e-12)
        order = np.argsort(w, kind="stable")
        assert np.all(np.diff(out[order]) >= -1e-12)  # order preserved
        free = (out > floor + 1e-9) & (out < cap - 1e-9)
        if free.sum() >= 2:  # free domains keep their proportions
            i, j = np.flatnonzero(free)[:2]
            assert out[i] / out[j] == pytest.approx(w[i] / w[j], rel=1e-9)
    assert np.array_equal(apply_floor_cap([0.2, 0.8]), np.array([0.2, 0.8]))
    with pytest.raises(ValueError, match="weight_floor"):
        apply_floor_cap([0.5, 0.5], floor=0.6)
    with pytest.raises(ValueError, match="weight_cap"):
        apply_floor_cap([0.5, 0.5], cap=0.4)


def test_repetition_cap_zeroes_exhausted_domains_and_renormalises():
    w = np.array([0.5, 0.3, 0.2])
    out = apply_repetition_cap(w, epochs_used=[2.0, 0.5, 1.99], max_epochs=2.0)
    np.testing.assert_allclose(out, [0.0, 0.6, 0.4])
    # With the interval size known, a domain is limited to its remaining budget:
    # domain 0 has 0.25 epochs left and a whole interval would be 1 epoch of it -> weight <= 0.25.
    out = apply_repetition_cap(w, [1.75, 0.0, 0.0], 2.0, interval_epochs=[1.0, 0.1, 0.1])
    np.testing.assert_allclose(out, [0.25, 0.75 * 0.6, 0.75 * 0.4])
    with pytest.raises(ValueError, match="max_epochs_per_domain"):
        bound_weights(w, 0.0, [0.1, 0.1, 0.1])


# ------------------------------------------------------------------ paired log-ratio and its SE
def test_paired_log_ratio_against_numpy_by_hand():
    """64 paired samples: mean of d = CE_S - CE_T, sd(ddof=1) / sqrt(64), t(0.975, 63) = 1.998."""
    from megatron_ddk.ddk.math import paired_log_ratio, ratio_interval

    rng = np.random.default_rng(7)
    teacher = rng.uniform(2.0, 4.0, 64)
    student = teacher + 0.5 + rng.normal(0.0, 0.3, 64)
    d = student - teacher
    mean = d.sum() / 64
    sd = math.sqrt(((d - mean) ** 2).sum() / 63)
    se = sd / math.sqrt(64)
    est = paired_log_ratio(student, teacher)
    assert est.num_samples == 64
    assert est.log_ratio == pytest.approx(mean, rel=1e-12)
    assert est.se == pytest.approx(se, rel=1e-12)
    lo, hi = ratio_interval(est)
    # t(0.975, 63) = 1.998 (table); t_critical is accurate to 1e-3 there
    assert lo == pytest.approx(math.exp(mean - 1.998 * se), rel=1e-3 * se)
    assert hi == pytest.approx(math.exp(mean + 1.998 * se), rel=1e-3 * se)
    assert lo < math.exp(mean) < hi


def test_paired_log_ratio_weights_by_tokens_and_drops_empty_samples():
    from megatron_ddk.ddk.math import paired_log_ratio

    s, t = [3.0, 2.0, 4.0, 9.0], [1.0, 1.5, 2.0, float("nan")]
    tokens = [10, 30, 60, 5]  # the last sample has no teacher loss: dropped
    est = paired_log_ratio(s, t, tokens)
    d, w = [2.0, 0.5, 2.0], [0.1, 0.3, 0.6]
    mean = sum(wi * di for wi, di in zip(w, d))  # = loss_S - loss_T of the three samples
    assert est.log_ratio == pytest.approx((30 + 60 + 240) / 100 - (10 + 45 + 120) / 100)
    assert est.log_ratio == pytest.approx(mean)
    var = 3 / 2 * sum(wi ** 2 * (di - mean) ** 2 for wi, di in zip(w, d))
    assert est.se == pytest.approx(math.sqrt(var)) and est.num_samples == 3
    # equal tokens: the plain sd / sqrt(n)
    eq = paired_log_ratio(s[:3], t[:3], [7, 7, 7])
    assert eq.se == pytest.approx(np.std(d, ddof=1) / math.sqrt(3))
    assert paired_log_ratio([1.0], [0.5]).se is None
    with pytest.raises(ValueError, match="differ in number"):
        paired_log_ratio([1.0, 2.0], [1.0])


def test_t_critical_table_and_expansion():
    from megatron_ddk.ddk.math import t_critical

    for df, want in ((1, 12.706), (10, 2.228), (30, 2.042), (40, 2.021), (63, 1.998),
                     (120, 1.980), (499, 1.965)):
        assert t_critical(df) == pytest.approx(want, abs=1.5e-3)
    with pytest.raises(ValueError):
        t_critical(0)
