"""DDKController: Algorithm 1's sequence against Eq. 1 / Eq. 2 written out here (float math,
no numpy softmax): interval 0's r_0 kept apart from D_0's sampling, both signals, the carried
ratio of an unsampled domain, bounds that never enter Eq. 2's history, the history record and an
exact state_dict round trip."""

import json
import math

import numpy as np
import pytest

from megatron_ddk.config.schema import DDKConfig
from megatron_ddk.ddk import DDKController

NAMES = ["web", "code", "math", "books"]
NATURAL = [4.0, 2.0, 1.0, 1.0]
NAT = [x / sum(NATURAL) for x in NATURAL]
NAN = float("nan")


def _ratio(ls, lt):
    return [math.exp(s) / math.exp(t) for s, t in zip(ls, lt)]  # ppl_S / ppl_T


def _eq1(ratio):
    e = [math.exp(x) for x in ratio]
    return [x / sum(e) for x in e]


def _eq2(r, ratio, alpha):
    psi = [ri * math.exp(x) for ri, x in zip(r, ratio)]
    return [alpha * p / sum(psi) + (1 - alpha) / len(r) for p in psi]


def _close(a, b, tol=1e-12):
    assert len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)), (a, b)


def _losses(rng):
    teacher = rng.uniform(1.5, 3.0, 4)
    return teacher + rng.uniform(0.0, 1.5, 4), teacher


@pytest.mark.parametrize("sampling", ["natural", "uniform", "eq1", "manifest"])
def test_interval0_r0_is_eq1_whatever_d0_is_sampled_with(sampling):
    """Algorithm 1: r_0 = Eq. 1 before step 1; D_0 follows initial_sampling; psi_1 = r_0 e^ratio."""
    rng = np.random.default_rng(0)
    ctl = DDKController(DDKConfig(initial_sampling=sampling), NAMES, NATURAL,
                        manifest_weights=[1, 1, 2, 4])
    ls, lt = _losses(rng)
    assert ctl.needs_validation() and ctl.needs_ratio()
    w0 = ctl.next_weights(0, ls, lt)
    r0 = _eq1(_ratio(ls, lt))
    want = {"natural": NAT, "uniform": [0.25] * 4, "eq1": r0, "manifest": [1 / 8, 1 / 8, 2 / 8,
                                                                          4 / 8]}[sampling]
    _close(list(w0), want)
    rec = ctl.history[0]
    _close(rec["r0"], r0)
    _close(rec["r"], r0)
    _close(rec["ratio"], _ratio(ls, lt))
    assert (rec["r0_source"], rec["initial_sampling"], rec["signal"]) == ("eq1", sampling,
                                                                          "validation")
    r = r0
    for t in range(1, 5):  # the teacher's losses come from the cache from now on
        ls = lt + rng.uniform(0.0, 1.5, 4)
        w = ctl.next_weights(100 * t, ls)
        r = _eq2(r, _ratio(ls, lt), 0.5)
        _close(list(w), r)
        _close(ctl.history[-1]["r"], r)
        assert min(w) >= 0.5 / 4 - 1e-15
    assert ctl.interval == 4 and len(ctl.history) == 5 and "r0" not in ctl.history[-1]


def test_no_smoothing_equal_and_static():
    rng = np.random.default_rng(1)
    ls, lt = _losses(rng)
    ctl = DDKController(DDKConfig(policy="ddk_no_smoothing"), NAMES, NATURAL)
    _close(list(ctl.next_weights(0, ls, lt)), NAT)  # D_0: natural, as for ddk
    _close(ctl.history[0]["r0"], _eq1(_ratio(ls, lt)))
    for step in range(1, 4):
        ls = lt + rng.uniform(0, 2, 4)
        _close(list(ctl.next_weights(step, ls)), _eq1(_ratio(ls, lt)))  # no history
    for cfg, want in ((DDKConfig(policy="equal"), [0.25] * 4),
                      (DDKConfig(policy="static"), NAT),
                      (DDKConfig(policy="static", static_weights=[0, 1, 1, 2]),
                       [0, 0.25, 0.25, 0.5])):
        for signal in ("validation", "training"):
            cfg.signal = signal
            ctl = DDKController(cfg, NAMES, NATURAL)
            assert not ctl.needs_validation() and not ctl.needs_ratio()
            for step in range(4):
                _close(list(ctl.next_weights(step)), want, tol=0)
            assert ctl.history[0]["r0"] is None and ctl.history[2]["ratio"] is None


def test_removed_initial_weights_and_missing_losses_are_clear_errors():
    with pytest.raises(ValueError, match="initial_weights.*removed.*initial_sampling"):
        DDKController(DDKConfig(initial_weights="eq1"), NAMES, NATURAL)
    with pytest.raises(ValueError, match="needs student losses"):
        DDKController(DDKConfig(), NAMES, NATURAL).next_weights(0)
    with pytest.raises(ValueError, match="manifest"):
        DDKController(DDKConfig(initial_sampling="manifest"), NAMES, NATURAL,
                      manifest_weights=[1, None, 1, 1]).next_weights(0, [3.0] * 4, [2.0] * 4)
    with pytest.raises(ValueError, match="training"):
        DDKController(DDKConfig(signal="training", initial_sampling="eq1"), NAMES,
                      NATURAL).next_weights(0)
    ctl = DDKController(DDKConfig(signal="training"), NAMES, NATURAL)
    ctl.next_weights(0)
    with pytest.raises(ValueError, match="needs student losses"):
        ctl.next_weights(4)
    with pytest.raises(ValueError, match="no domain"):
        ctl.next_weights(4, [NAN] * 4, [NAN] * 4)
    with pytest.raises(ValueError, match="not finite.*code"):  # only NaN means "no tokens"
        ctl.next_weights(4, [1.0, float("inf"), 1.0, 1.0], [1.0] * 4)
    with pytest.raises(ValueError, match="not finite"):  # validation: every domain measured
        DDKController(DDKConfig(), NAMES, NATURAL).next_weights(0, [1, NAN, 1, 1], [1.0] * 4)


def test_training_signal_r0_uniform_and_unsampled_domains_keep_their_ratio():
    ctl = DDKController(DDKConfig(signal="training"), NAMES, NATURAL)
    assert not ctl.needs_validation() and not ctl.needs_ratio()
    _close(list(ctl.next_weights(0)), NAT)
    rec = ctl.history[0]
    assert (rec["r0_source"], rec["ratio"], rec["loss_student"]) == ("uniform", None, None)
    _close(rec["r0"], [0.25] * 4)
    assert ctl.needs_ratio() and not ctl.needs_validation()
    # interval 0 had no "math" tokens: never measured, so it gets the mean measured ratio
    ls1, lt1 = [3.0, 2.5, NAN, 4.0], [2.0, 2.2, NAN, 2.5]
    w1 = ctl.next_weights(4, ls1, lt1, signal_tokens=[90, 40, 0, 30])
    measured = [math.exp(s - t) for s, t in zip(ls1, lt1) if s == s]
    ratio1 = [measured[0], measured[1], sum(measured) / 3, measured[2]]
    r1 = _eq2([0.25] * 4, ratio1, 0.5)
    _close(list(w1), r1)
    rec = ctl.history[1]
    _close(rec["ratio"], ratio1)
    assert rec["ratio_source"] == ["measured", "measured", "mean", "measured"]
    assert rec["loss_student"][2] is None and rec["ppl_teacher"][2] is None
    assert rec["signal_tokens"] == [90, 40, 0, 30]
    # the teacher's losses are the interval's own (not cached); "web" is carried now
    ls2, lt2 = [NAN, 2.4, 3.0, 3.1], [NAN, 2.3, 2.1, 2.6]
    w2 = ctl.next_weights(8, ls2, lt2)
    ratio2 = [ratio1[0]] + [math.exp(s - t) for s, t in zip(ls2[1:], lt2[1:])]
    _close(list(w2), _eq2(r1, ratio2, 0.5))
    assert ctl.history[2]["ratio_source"] == ["carried", "measured", "measured", "measured"]
    assert ctl.teacher_losses is None
    json.dumps(ctl.history, allow_nan=False)  # missing values are null, not NaN


def test_bounds_shape_the_sampling_weights_but_not_eq2s_history():
    rng = np.random.default_rng(2)
    cfg = DDKConfig(policy="ddk", weight_floor=0.2, weight_cap=0.3)
    ctl = DDKController(cfg, NAMES, NATURAL)
    ls, lt = _losses(rng)
    w = ctl.next_weights(0, ls, lt)
    assert abs(w.sum() - 1) < 1e-12 and w.min() >= 0.2 - 1e-12 and w.max() <= 0.3 + 1e-12
    r = _eq1(_ratio(ls, lt))
    for step in range(1, 6):
        ls = lt + rng.uniform(0, 4, 4)
        w = ctl.next_weights(step, ls)
        r = _eq2(r, _ratio(ls, lt), 0.5)  # from the unbounded r, not from the weights
        _close(ctl.history[-1]["r"], r)
        assert w.min() >= 0.2 - 1e-12 and w.max() <= 0.3 + 1e-12


def test_history_records():
    ctl = DDKController(DDKConfig(alpha=0.3), NAMES, NATURAL, samples_per_epoch=[100, 50, 20,
                                                                                  10])
    ls, lt = [2.0, 3.0, 2.5, 4.0], [1.5, 2.0, 2.5, 3.0]
    ctl.next_weights(0, ls, lt, samples_consumed=[0, 0, 0, 0])
    ctl.next_weights(1000, ls, samples_consumed=[50, 50, 30, 5], tokens_consumed=[1, 2, 3, 4])
    rec = ctl.history[-1]
    assert rec["interval"] == 1 and rec["step"] == 1000
    assert (rec["policy"], rec["alpha"], rec["signal"]) == ("ddk", 0.3, "validation")
    assert rec["ppl_student"] == pytest.approx([math.exp(x) for x in ls])
    assert rec["ppl_teacher"] == pytest.approx([math.exp(x) for x in lt])
    assert rec["ratio"] == pytest.approx([math.exp(s - t) for s, t in zip(ls, lt)])
    assert rec["ratio_source"] == ["measured"] * 4
    assert rec["epochs"] == pytest.approx([0.5, 1.0, 1.5, 0.5])
    assert rec["samples_consumed"] == [50, 50, 30, 5] and rec["tokens_consumed"] == [1, 2, 3, 4]
    assert rec["weights"] == pytest.approx(list(ctl.weights)) and sum(rec["weights"]) == \
        pytest.approx(1.0)
    json.dumps(ctl.history, allow_nan=False)  # plain data


@pytest.mark.parametrize("signal", ["validation", "training"])
def test_state_dict_round_trip_is_exact(signal):
    rng = np.random.default_rng(3)
    cfg = DDKConfig(weight_floor=0.05, signal=signal)

    def losses(step):
        if signal == "validation":
            return _losses(rng) if step == 0 else (rng.uniform(2, 4, 4),)
        if step == 0:
            return ()
        ls, lt = rng.uniform(2, 4, 4), rng.uniform(1, 2, 4)
        ls[step % 4] = lt[step % 4] = NAN
        return ls, lt

    a = DDKController(cfg, NAMES, NATURAL)
    for step in range(3):
        a.next_weights(step, *losses(step))
    state = json.loads(json.dumps(a.state_dict(), allow_nan=False))
    b = DDKController(cfg, NAMES, NATURAL)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for step in range(3, 6):
        args = losses(step)
        assert np.array_equal(a.next_weights(step, *args), b.next_weights(step, *args))
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="domains"):
        DDKController(cfg, ["x", "y", "z", "w"], NATURAL).load_state_dict(state)
    other = "training" if signal == "validation" else "validation"
    with pytest.raises(ValueError, match="signal"):
        DDKController(DDKConfig(signal=other), NAMES, NATURAL).load_state_dict(state)


def test_config_checks_name_the_new_fields():
    from megatron_ddk.config import load_config, static_errors

    def errors(*overrides):
        cfg = load_config(None, ["distill.teacher={num_layers: 2}", "distill.teacher_load=/t"]
                          + list(overrides))
        return " ".join(e for e in static_errors(cfg) if "ddk." in e)

    assert errors() == ""
    assert "initial_sampling" in errors("ddk.initial_weights=eq1")
    assert "use initial_sampling natural or uniform" in errors("ddk.signal=training",
                                                               "ddk.initial_sampling=eq1")
    assert "ddk.signal='validation'" in errors("ddk.signal=training",
                                               "distill.teacher_logits=/store")
    assert errors("ddk.signal=training") == ""


def _per_sample(rng, sizes=(5, 3, 8, 2)):
    teacher = [rng.uniform(1.5, 3.0, n) for n in sizes]
    student = [t + rng.uniform(0.0, 1.5, t.size) for t in teacher]
    return student, teacher


def _means(per):
    return [float(np.mean(x)) for x in per]


def test_ratio_standard_error_and_interval_in_every_record():
    """ratio_log_se = sd(d, ddof=1) / sqrt(n) of d = CE_S - CE_T per sample (written out here),
    ratio_ci95 = exp(log ratio -+ t(0.975, n - 1) se) with table t values; the teacher's
    per-sample losses are cached with its losses."""
    rng = np.random.default_rng(11)
    t975 = {4: 2.776, 2: 4.303, 7: 2.365, 1: 12.706}
    ctl = DDKController(DDKConfig(), NAMES, NATURAL)
    s0, t0 = _per_sample(rng)
    ctl.next_weights(0, _means(s0), _means(t0), student_sample_losses=s0,
                     teacher_sample_losses=t0)
    s1 = [t + rng.uniform(0.0, 1.0, t.size) for t in t0]
    ctl.next_weights(5, _means(s1), student_sample_losses=s1)  # teacher's per-sample cached
    for rec, student in zip(ctl.history, (s0, s1)):
        for i, (s, t) in enumerate(zip(student, t0)):
            d = [a - b for a, b in zip(s, t)]
            n = len(d)
            mean = sum(d) / n
            se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
            assert rec["ratio_log_se"][i] == pytest.approx(se, rel=1e-12)
            lo, hi = rec["ratio_ci95"][i]
            assert lo == pytest.approx(math.exp(mean - t975[n - 1] * se), rel=1e-12)
            assert hi == pytest.approx(math.exp(mean + t975[n - 1] * se), rel=1e-12)
            assert lo < rec["ratio"][i] < hi
    json.dumps(ctl.history, allow_nan=False)


def test_ratio_standard_error_is_none_without_per_sample_losses():
    rng = np.random.default_rng(12)
    ls, lt = _losses(rng)
    ctl = DDKController(DDKConfig(), NAMES, NATURAL)  # e.g. an offline teacher store
    s0, _ = _per_sample(rng)
    ctl.next_weights(0, ls, lt, student_sample_losses=s0)
    assert ctl.history[0]["ratio_log_se"] is None and ctl.history[0]["ratio_ci95"] is None
    train = DDKController(DDKConfig(signal="training"), NAMES, NATURAL)
    train.next_weights(0)
    train.next_weights(3, ls, lt)
    assert all(r["ratio_log_se"] is None and r["ratio_ci95"] is None for r in train.history)
    other = DDKController(DDKConfig(), NAMES, NATURAL)
    s, t = _per_sample(rng)
    other.next_weights(0, _means(s), _means(t), student_sample_losses=s,
                       teacher_sample_losses=t)
    with pytest.raises(ValueError, match="validation set changed"):
        other.next_weights(1, _means(s), student_sample_losses=[x[:1] for x in s])


@pytest.mark.parametrize("with_samples", [True, False])
def test_state_dict_keeps_the_teachers_per_sample_losses(with_samples):
    """A resumed run keeps producing SEs; a version-2 state (no per-sample losses) still loads
    and then records None."""
    rng = np.random.default_rng(13)
    s0, t0 = _per_sample(rng)
    a = DDKController(DDKConfig(), NAMES, NATURAL)
    a.next_weights(0, _means(s0), _means(t0), student_sample_losses=s0,
                   teacher_sample_losses=t0 if with_samples else None)
    state = json.loads(json.dumps(a.state_dict(), allow_nan=False))
    assert state["version"] == 3
    assert (state["teacher_sample_losses"] is not None) == with_samples
    b = DDKController(DDKConfig(), NAMES, NATURAL)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    s1 = [t + 0.5 + rng.uniform(0.0, 0.1, t.size) for t in t0]
    for ctl in (a, b):
        ctl.next_weights(5, _means(s1), student_sample_losses=s1)
    assert a.history[-1] == b.history[-1]
    assert (b.history[-1]["ratio_log_se"] is not None) == with_samples
    old = dict(state, version=2)
    del old["teacher_sample_losses"]
    c = DDKController(DDKConfig(), NAMES, NATURAL)
    c.load_state_dict(old)
    c.next_weights(5, _means(s1), student_sample_losses=s1)
    assert c.history[-1]["ratio_log_se"] is None
    assert c.history[-1]["weights"] == a.history[-1]["weights"]
    with pytest.raises(ValueError, match="version 1"):
        DDKController(DDKConfig(), NAMES, NATURAL).load_state_dict(dict(state, version=1))
