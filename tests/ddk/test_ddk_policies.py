"""The four mixture policies: each against its formula, the ablations' defining properties."""

import math

import numpy as np
import pytest

from megatron_ddk.ddk import POLICIES, ddk, ddk_no_smoothing, equal, get_policy, static


def _softmax_ref(x):
    e = [math.exp(v) for v in x]
    return np.array([v / sum(e) for v in e])


def _ratios(rng, n):
    return rng.uniform(1.0, 8.0, n)


def test_ddk_is_eq2_and_no_smoothing_is_eq1():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 10))
        prev, ratio, alpha = rng.dirichlet(np.ones(n)), _ratios(rng, n), float(rng.uniform())
        psi = prev * np.array([math.exp(x) for x in ratio])
        np.testing.assert_allclose(ddk(prev, ratio, alpha), alpha * psi / psi.sum()
                                   + (1 - alpha) / n, rtol=1e-12)
        other_prev = rng.dirichlet(np.ones(n))
        np.testing.assert_allclose(ddk_no_smoothing(prev, ratio, alpha), _softmax_ref(ratio),
                                   rtol=1e-12)
        assert np.array_equal(ddk_no_smoothing(prev, ratio, alpha),
                              ddk_no_smoothing(other_prev, ratio, alpha))  # no history


def test_equal_and_static_never_move():
    rng = np.random.default_rng(1)
    n = 5
    given = np.array([3.0, 1.0, 0.0, 2.0, 2.0])
    w_eq, w_st = np.full(n, 0.2), static(np.full(n, 0.2), None, 0.5, given)
    np.testing.assert_allclose(w_st, given / given.sum())
    for _ in range(50):
        ratio = _ratios(rng, n)
        new_eq = equal(w_eq, ratio, 0.5, None)
        new_st = static(w_st, ratio, 0.5, given)
        assert np.array_equal(new_eq, np.full(n, 0.2)) and np.array_equal(new_st, w_st)
        w_eq, w_st = new_eq, new_st


def test_no_smoothing_moves_further_than_ddk_from_uniform():
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        uniform, ratio = np.full(n, 1.0 / n), _ratios(rng, n)
        alpha = float(rng.uniform(0.05, 0.95))
        l1_ddk = np.abs(ddk(uniform, ratio, alpha) - uniform).sum()
        l1_raw = np.abs(ddk_no_smoothing(uniform, ratio, alpha) - uniform).sum()
        assert l1_raw > l1_ddk > 0


def test_the_domain_with_the_highest_ratio_gains_weight():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        uniform, ratio = np.full(n, 1.0 / n), _ratios(rng, n)
        top = int(np.argmax(ratio))
        for policy in (ddk, ddk_no_smoothing):
            new = policy(uniform, ratio, 0.5)
            assert new[top] > uniform[top] and int(np.argmax(new)) == top
        # From any mixture, the un-smoothed Eq. 2 share (alpha = 1) of the top domain grows.
        prev = rng.dirichlet(np.ones(n))
        assert ddk(prev, ratio, 1.0)[top] >= prev[top]


def test_registry_and_errors():
    assert set(POLICIES) == {"ddk", "ddk_no_smoothing", "equal", "static"}
    assert get_policy("equal") is equal
    with pytest.raises(ValueError, match="unknown policy"):
        get_policy("doremi")
    with pytest.raises(ValueError, match="losses"):
        ddk(np.full(2, 0.5), None, 0.5)
    with pytest.raises(ValueError, match="static_weights"):
        static(np.full(2, 0.5), None, 0.5, None)
