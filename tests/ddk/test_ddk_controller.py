"""DDKController: Algorithm 1's sequence of weights against Eq. 1 / Eq. 2 written out here, the
initial-weight rules, bounds, the history record and an exact state_dict round trip."""

import json
import math

import numpy as np
import pytest

from megatron_ddk.config.schema import DDKConfig
from megatron_ddk.ddk import DDKController

NAMES = ["web", "code", "math", "books"]
NATURAL = [4.0, 2.0, 1.0, 1.0]


def _eq1(ls, lt):
    e = [math.exp(math.exp(s) / math.exp(t)) for s, t in zip(ls, lt)]
    return np.array([x / sum(e) for x in e])


def _eq2(r, ls, lt, alpha):
    psi = [ri * math.exp(math.exp(s) / math.exp(t)) for ri, s, t in zip(r, ls, lt)]
    return np.array([alpha * p / sum(psi) + (1 - alpha) / len(r) for p in psi])


def _losses(rng):
    teacher = rng.uniform(1.5, 3.0, 4)
    return teacher + rng.uniform(0.0, 1.5, 4), teacher


def test_ddk_sequence_follows_eq1_then_eq2_with_cached_teacher():
    rng = np.random.default_rng(0)
    ctl = DDKController(DDKConfig(policy="ddk", alpha=0.5), NAMES, NATURAL)
    ls, lt = _losses(rng)
    assert ctl.needs_losses()
    r = ctl.next_weights(0, ls, lt)
    np.testing.assert_allclose(r, _eq1(ls, lt), rtol=1e-12)
    for t in range(1, 6):
        ls = lt + rng.uniform(0.0, 1.5, 4)
        new = ctl.next_weights(100 * t, ls)  # teacher losses come from the cache
        np.testing.assert_allclose(new, _eq2(r, ls, lt, 0.5), rtol=1e-12)
        assert np.all(new >= 0.5 / 4 - 1e-15)
        r = new
    assert ctl.interval == 5 and len(ctl.history) == 6


def test_initial_weight_rules_and_fixed_policies():
    rng = np.random.default_rng(1)
    ls, lt = _losses(rng)
    nat = np.array(NATURAL) / sum(NATURAL)
    for rule, want in (("natural", nat), ("uniform", np.full(4, 0.25)),
                       ("manifest", np.array([1, 1, 2, 4]) / 8)):
        ctl = DDKController(DDKConfig(initial_weights=rule), NAMES, NATURAL,
                            manifest_weights=[1, 1, 2, 4])
        np.testing.assert_allclose(ctl.next_weights(0, ls, lt), want, rtol=1e-12)
        np.testing.assert_allclose(ctl.next_weights(10, ls), _eq2(want, ls, lt, 0.5), rtol=1e-12)
    with pytest.raises(ValueError, match="manifest"):
        DDKController(DDKConfig(initial_weights="manifest"), NAMES, NATURAL,
                      manifest_weights=[1, None, 1, 1]).next_weights(0, ls, lt)
    for cfg, want in ((DDKConfig(policy="equal"), np.full(4, 0.25)),
                      (DDKConfig(policy="static"), nat),
                      (DDKConfig(policy="static", static_weights=[0, 1, 1, 2]),
                       np.array([0, 1, 1, 2]) / 4)):
        ctl = DDKController(cfg, NAMES, NATURAL)
        assert not ctl.needs_losses()
        for step in range(5):
            ls = lt + rng.uniform(0, 3, 4)
            assert np.array_equal(ctl.next_weights(step, ls, lt), want)
    # ddk without losses is a user error with a clear message.
    with pytest.raises(ValueError, match="needs student losses"):
        DDKController(DDKConfig(), NAMES, NATURAL).next_weights(0)


def test_floor_and_cap_bound_every_interval():
    rng = np.random.default_rng(2)
    cfg = DDKConfig(policy="ddk_no_smoothing", weight_floor=0.1, weight_cap=0.4)
    ctl = DDKController(cfg, NAMES, NATURAL)
    for step in range(10):
        lt = rng.uniform(1, 2, 4)
        ls = lt + rng.uniform(0, 4, 4)
        w = ctl.next_weights(step, ls, lt)
        assert abs(w.sum() - 1) < 1e-12 and w.min() >= 0.1 - 1e-12 and w.max() <= 0.4 + 1e-12
        assert ctl.history[-1]["r"] == pytest.approx(list(_eq1(ls, lt)), rel=1e-12)


def test_history_records():
    ctl = DDKController(DDKConfig(), NAMES, NATURAL, samples_per_epoch=[100, 50, 20, 10])
    ls, lt = [2.0, 3.0, 2.5, 4.0], [1.5, 2.0, 2.5, 3.0]
    ctl.next_weights(0, ls, lt, samples_consumed=[0, 0, 0, 0])
    ctl.next_weights(1000, ls, samples_consumed=[50, 50, 30, 5], tokens_consumed=[1, 2, 3, 4])
    rec = ctl.history[-1]
    assert rec["interval"] == 1 and rec["step"] == 1000
    assert rec["ppl_student"] == pytest.approx([math.exp(x) for x in ls])
    assert rec["ppl_teacher"] == pytest.approx([math.exp(x) for x in lt])
    assert rec["ratio"] == pytest.approx([math.exp(s - t) for s, t in zip(ls, lt)])
    assert rec["epochs"] == pytest.approx([0.5, 1.0, 1.5, 0.5])
    assert rec["samples_consumed"] == [50, 50, 30, 5] and rec["tokens_consumed"] == [1, 2, 3, 4]
    assert rec["weights"] == pytest.approx(list(ctl.weights)) and sum(rec["weights"]) == \
        pytest.approx(1.0)
    json.dumps(ctl.history)  # plain data


def test_state_dict_round_trip_is_exact():
    rng = np.random.default_rng(3)
    cfg = DDKConfig(weight_floor=0.05)
    a = DDKController(cfg, NAMES, NATURAL)
    for step in range(3):
        a.next_weights(step, *_losses(rng) if step == 0 else (rng.uniform(2, 4, 4),))
    state = json.loads(json.dumps(a.state_dict()))
    b = DDKController(cfg, NAMES, NATURAL)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for step in range(3, 6):
        ls = rng.uniform(2, 4, 4)
        assert np.array_equal(a.next_weights(step, ls), b.next_weights(step, ls))
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="domains"):
        DDKController(cfg, ["x", "y", "z", "w"], NATURAL).load_state_dict(state)
