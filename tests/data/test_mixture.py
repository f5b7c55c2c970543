"""IntervalMixture: per-interval counts, determinism, mid-interval resume, epoch wraps, and the
repetition cap enforced through the controller."""

import json
from collections import Counter

import numpy as np
import pytest

from megatron_ddk.config.schema import DDKConfig
from megatron_ddk.data.mixture import IntervalMixture
from megatron_ddk.ddk import DDKController


def _run(mix, history):
    """All batches of the intervals in `history` (list of weight vectors), concatenated."""
    out = []
    for w in history:
        mix.start_interval(w)
        for _ in range(mix.interval):
            out.extend(mix.next_global_batch())
    return out


def _random_history(rng, n_domains, n_intervals):
    hist = []
    for _ in range(n_intervals):
        w = rng.dirichlet(np.full(n_domains, 0.7))
        w[rng.random(n_domains) < 0.2] = 0.0
        if w.sum() == 0:
            w[0] = 1.0
        hist.append(w / w.sum())
    return hist


def test_counts_per_interval_within_one_sample_of_weights():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 7))
        gbs, k = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        sizes = rng.integers(1, 40, size=n)
        mix = IntervalMixture(sizes, gbs, k, seed=trial)
        for w in _random_history(rng, n, 4):
            counts = mix.start_interval(w)
            served = []
            for _ in range(k):
                batch = mix.next_global_batch()
                assert len(batch) == gbs
                served += [d for d, _ in batch]
            realised = np.bincount(served, minlength=n)
            assert np.array_equal(realised, counts)
            assert realised.sum() == k * gbs
            assert np.all(np.abs(realised - w * k * gbs) < 1.0 + 1e-9)
            assert np.all(realised[w == 0] == 0)


def test_same_seed_and_history_give_the_same_stream():
    rng = np.random.default_rng(1)
    hist = _random_history(rng, 3, 5)
    sizes = [13, 7, 30]
    a = _run(IntervalMixture(sizes, 4, 3, seed=11), hist)
    b = _run(IntervalMixture(sizes, 4, 3, seed=11), hist)
    assert a == b
    assert a != _run(IntervalMixture(sizes, 4, 3, seed=12), hist)
    other = [hist[0], hist[1], np.array([1.0, 0.0, 0.0]), hist[3], hist[4]]
    assert a != _run(IntervalMixture(sizes, 4, 3, seed=11), other)


def _take(mix, steps):
    return [e for _ in range(steps) for e in mix.next_global_batch()]


def test_state_saved_mid_interval_restores_the_identical_remainder():
    rng = np.random.default_rng(2)
    hist = _random_history(rng, 4, 4)
    sizes, gbs, k = [9, 25, 4, 17], 6, 5
    mix = IntervalMixture(sizes, gbs, k, seed=7)
    before = _run(mix, hist[:2])
    mix.start_interval(hist[2])
    head = _take(mix, 2)
    state = json.loads(json.dumps(mix.state_dict()))  # plain data survives a JSON round trip
    consumed = mix.samples_consumed.copy()
    tail = _take(mix, k - 2) + _run(mix, hist[3:])

    resumed = IntervalMixture(sizes, gbs, k, seed=7)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.samples_consumed, consumed)
    assert resumed.steps_left == k - 2
    tail2 = _take(resumed, k - 2) + _run(resumed, hist[3:])
    assert tail2 == tail
    # Nothing repeated or skipped: the uninterrupted stream is head + the resumed tail.
    fresh = IntervalMixture(sizes, gbs, k, seed=7)
    assert _run(fresh, hist) == before + head + tail2
    assert np.array_equal(resumed.samples_consumed, fresh.samples_consumed)
    assert np.array_equal(resumed.num_wraps, fresh.num_wraps)
    with pytest.raises(ValueError, match="global_batch_size"):
        IntervalMixture(sizes, gbs + 1, k, seed=7).load_state_dict(state)


def test_exhausted_domain_wraps_with_a_counted_epoch_and_a_new_shuffle():
    # Domain 0 has 10 samples and gets 5 per interval: intervals 0-1 are epoch 0, 2-3 epoch 1.
    mix = IntervalMixture([10, 1000], global_batch_size=10, interval=1, seed=3)
    per_interval = []
    for t in range(4):
        mix.start_interval([0.5, 0.5])
        ids = [s for d, s in mix.next_global_batch() if d == 0]
        per_interval.append(ids)
        assert mix.num_wraps[0] == (1 if t >= 2 else 0)
        assert mix.num_wraps[1] == 0
    assert sorted(per_interval[0] + per_interval[1]) == list(range(10))
    assert sorted(per_interval[2] + per_interval[3]) == list(range(10))
    assert set(per_interval[2]) != set(per_interval[0])  # epoch 1 is a different order
    assert mix.epochs[0] == pytest.approx(2.0)
    # 15 of a 10-sample domain in one interval: every id once, five of them twice.
    mix = IntervalMixture([10, 1000], global_batch_size=15, interval=1, seed=4)
    mix.start_interval([1.0, 0.0])
    counts = Counter(s for _, s in mix.next_global_batch())
    assert sorted(counts) == list(range(10)) and sorted(counts.values()) == [1] * 5 + [2] * 5
    assert mix.num_wraps.tolist() == [1, 0]


def test_repetition_cap_holds_through_the_controller():
    sizes, gbs, k, cap = [50, 400, 400], 10, 2, 2.0
    cfg = DDKConfig(policy="static", static_weights=[0.8, 0.1, 0.1], max_epochs_per_domain=cap)
    ctl = DDKController(cfg, ["small", "x", "y"], [1, 1, 1], samples_per_epoch=sizes,
                        samples_per_interval=k * gbs)
    mix = IntervalMixture(sizes, gbs, k, seed=0)
    for t in range(30):
        w = ctl.next_weights(t * k, samples_consumed=mix.samples_consumed)
        mix.start_interval(w)
        for _ in range(k):
            mix.next_global_batch()
        assert np.all(mix.samples_consumed <= np.floor(cap * np.array(sizes)))
    assert mix.samples_consumed[0] >= cap * sizes[0] - 1  # it was used up to the cap
    assert ctl.history[-1]["weights"][0] < 0.05 and ctl.history[0]["weights"][0] == 0.8
    assert mix.samples_consumed.sum() == 30 * k * gbs


def test_interval_must_be_restarted_and_partial_intervals():
    mix = IntervalMixture([5, 5], global_batch_size=2, interval=3, seed=0)
    with pytest.raises(RuntimeError, match="start_interval"):
        mix.next_global_batch()
    counts = mix.start_interval([0.25, 0.75], num_steps=2)
    assert counts.tolist() == [1, 3]
    mix.next_global_batch()
    mix.next_global_batch()
    assert mix.steps_left == 0
    with pytest.raises(RuntimeError, match="start_interval"):
        mix.next_global_batch()
    with pytest.raises(ValueError, match="entries"):
        mix.start_interval([1.0, 0.0, 0.0])


def test_interval_is_shuffled_across_domains():
    mix = IntervalMixture([1000, 1000], global_batch_size=8, interval=50, seed=0)
    mix.start_interval([0.5, 0.5])
    domains = np.array([d for d, _ in _take(mix, 50)])
    changes = int(np.count_nonzero(np.diff(domains)))
    assert changes > 150  # ~200 expected for a random order; 1 if the domains came in blocks
    first = IntervalMixture([1000, 1000], global_batch_size=8, interval=50, seed=0)
    first.start_interval([0.5, 0.5])
    first.advance(50)
    first.start_interval([0.5, 0.5])
    second = np.array([d for d, _ in _take(first, 50)])
    assert not np.array_equal(second, domains)  # each interval has its own permutation


def _simulator():
    from megatron_ddk.commands import simulate_mixture

    return simulate_mixture


def _totals(text):
    block = text.split("totals:")[1].strip().split("\n\n")[0]  # up to the next blank line
    return {ln.split()[0]: int(ln.split()[1]) for ln in block.splitlines()[1:]}


def test_simulator_consumption(tmp_path, capsys):
    sim = _simulator()
    # equal policy: 12 steps x 6 samples spread evenly over 3 domains.
    sim.main(["--domains", "a=10,b=100,c=1000", "--synthetic", "--policy", "equal",
              "--steps", "12", "--interval", "5", "--global-batch-size", "6"])
    out = capsys.readouterr().out
    assert _totals(out) == {"a": 24, "b": 24, "c": 24}
    assert "a: first repeat in interval 1" in out and "c:" not in out.split("repeats")[1]
    # a recorded history, last vector repeated: 2 + 2 + 2 intervals of 10 samples.
    hist = tmp_path / "w.yaml"
    hist.write_text("- [1.0, 0.0]\n- [0.5, 0.5]\n")
    sim.main(["--domains", "x=7,y=50", "--weights", str(hist), "--steps", "6",
              "--interval", "2", "--global-batch-size", "5"])
    assert _totals(capsys.readouterr().out) == {"x": 10 + 5 + 5, "y": 5 + 5}


def test_simulator_replays_interval_records_only(tmp_path, capsys):
    """Step and end records carry weights too; only interval records are intervals, and a
    resumed run's repeated interval counts once (its last record)."""
    sim = _simulator()
    recs = [{"kind": "interval", "interval": 0, "step": 0, "weights": [1.0, 0.0],
             "domains": ["x", "y"]},
            {"kind": "step", "step": 1, "weights": [0.5, 0.5]},
            {"kind": "interval", "interval": 1, "step": 2, "weights": [0.2, 0.8],
             "domains": ["x", "y"]},
            {"kind": "step", "step": 3, "weights": [0.5, 0.5]},
            {"kind": "interval", "interval": 1, "step": 2, "weights": [0.0, 1.0],
             "domains": ["x", "y"]},  # resumed at the boundary: logged again
            {"kind": "step", "step": 4, "weights": [0.5, 0.5]},
            {"kind": "end", "step": 4, "weights": [0.5, 0.5]}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    sim.main(["--domains", "x=100,y=100", "--weights", str(path), "--steps", "4",
              "--interval", "2", "--global-batch-size", "5"])
    # interval 0: 2 steps x 5 samples all x; interval 1: all y
    assert _totals(capsys.readouterr().out) == {"x": 10, "y": 10}
    # the domains are matched by name, whatever order --domains lists them in
    sim.main(["--domains", "y=100,x=100", "--weights", str(path), "--steps", "4",
              "--interval", "2", "--global-batch-size", "5"])
    assert _totals(capsys.readouterr().out) == {"y": 10, "x": 10}
    steps_only = tmp_path / "steps.jsonl"
    steps_only.write_text(json.dumps(recs[1]) + "\n" + json.dumps(recs[3]) + "\n")
    with pytest.raises(ValueError, match="no interval records"):
        sim.main(["--domains", "x=100,y=100", "--weights", str(steps_only), "--steps", "4",
                  "--interval", "2", "--global-batch-size", "5"])
    with pytest.raises(ValueError, match=r"no weight for domain\(s\) \['z'\]"):
        sim.main(["--domains", "x=100,z=100", "--weights", str(path), "--steps", "4",
                  "--interval", "2", "--global-batch-size", "5"])


def test_applied_weights_are_the_chosen_weights_bit_for_bit():
    """What a policy chose is what the mixture applies and what its state (the step records'
    source) holds: a distribution whose float sum is off by rounding is not divided again."""
    rng = np.random.default_rng(7)
    found = 0
    for _ in range(200):
        w = rng.dirichlet(np.ones(5))
        w = w / w.sum()
        if w.sum() == 1.0:
            continue  # only vectors whose float sum misses 1 test anything
        found += 1
        mix = IntervalMixture([50] * 5, 4, 3, seed=0)
        mix.start_interval(w)
        applied = mix.state_dict()["weights"]
        assert applied == [float(x) for x in w]  # exact equality, no tolerance
    assert found > 20
    # Weights that are not a distribution are still normalised once.
    mix = IntervalMixture([50] * 3, 4, 3, seed=0)
    mix.start_interval([2.0, 1.0, 1.0])
    assert mix.state_dict()["weights"] == [0.5, 0.25, 0.25]
