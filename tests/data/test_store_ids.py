"""The id coding of format 2 (data/store_ids.py) against references written here: Elias-Fano
round trips of random and adversarial id sets, the low-bit count as the largest L with
n 2^L <= V (integers only), the stated worst-case size (never exceeded, and reached), the
mean-count bound (Jensen over any count distribution), and the bit packers."""

import math

import numpy as np
import pytest

from megatron_ddk.data import store_ids as si

VOCABS = [2, 5, 4096, 151_646, 2 ** 20]


def _low_ref(n: int, v: int) -> int:
    """The largest L >= 0 with n * 2^L <= v (0 when n > v / 2): floor(log2(v / n)), exactly."""
    low = 0
    while n * 2 ** (low + 1) <= v:
        low += 1
    return low


def _bits_ref(ids, v: int) -> int:
    """Bits of one token's ids under ef, counted from the definition: n L low bits, and per id in
    ascending order (h_i - h_{i-1}) zeros and a one."""
    ids = sorted(int(i) for i in ids)
    low = _low_ref(len(ids), v)
    highs = [i >> low for i in ids]
    return len(ids) * low + sum(h - p for h, p in zip(highs, [0] + highs[:-1])) + len(ids)


def _sets(rng, v: int, k: int, tokens: int):
    """Per token a set of 1..k distinct ids < v: random, both ends, consecutive runs, all-top."""
    out = []
    for t in range(tokens):
        n = int(rng.integers(1, min(k, v) + 1))
        kind = t % 5
        if kind == 0:
            ids = rng.choice(v, n, replace=False)
        elif kind == 1:  # both ends of the range
            inner = rng.choice(np.arange(1, v - 1), n - 2, replace=False) if n > 2 else []
            ids = np.concatenate([[0, v - 1][:n] if n > 1 else [(v - 1) * (t % 2)], inner])
        elif kind == 2:  # consecutive
            start = int(rng.integers(0, v - n + 1))
            ids = np.arange(start, start + n)
        elif kind == 3:  # all at the top end
            ids = np.arange(v - n, v)
        else:  # evenly spread over the vocabulary
            ids = np.unique(np.linspace(0, v - 1, n).round().astype(np.int64))
        out.append(rng.permutation(np.asarray(ids, dtype=np.int64)))
    return out


def _encode(sets, v):
    counts = np.array([len(s) for s in sets], dtype=np.int64)
    flat = np.concatenate([np.sort(s) for s in sets])
    low, high = si.ef_encode(flat, counts, v)
    return counts, flat, low, high


@pytest.mark.parametrize("v", VOCABS)
def test_low_bits_are_the_largest_l_with_n_2_pow_l_within_v(v):
    n = np.arange(1, min(v, 3000) + 1)
    assert list(si.ef_low_bits(n, v)) == [_low_ref(int(x), v) for x in n]


@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("k", [1, 24, 64])
def test_ef_round_trip_and_size_of_random_and_adversarial_sets(v, k):
    rng = np.random.default_rng(v * 31 + k)
    sets = _sets(rng, v, k, 200)
    counts, flat, low, high = _encode(sets, v)
    assert np.array_equal(si.ef_decode(low, high, counts, v), flat)
    bits = [_bits_ref(s, v) for s in sets]
    bound = [int(si.ef_bits_bound(len(s), v)) for s in sets]
    assert all(b <= c for b, c in zip(bits, bound))
    # the streams hold exactly the bits of the definition (each padded to a byte)
    low_bits = sum(len(s) * _low_ref(len(s), v) for s in sets)
    assert len(low) == math.ceil(low_bits / 8) == si.ef_low_bytes(counts, v)
    assert len(low) + len(high) == math.ceil(low_bits / 8) + math.ceil((sum(bits) - low_bits) / 8)
    assert len(low) + len(high) <= si.ef_sample_bytes_bound(counts, v)


@pytest.mark.parametrize("v", [2, 5, 9])
def test_every_id_of_a_tiny_vocabulary(v):
    sets = [np.arange(v), np.arange(v)[::-1].copy(), np.array([v - 1]), np.array([0])]
    counts, flat, low, high = _encode(sets, v)
    assert np.array_equal(si.ef_decode(low, high, counts, v), flat)


@pytest.mark.parametrize("v", VOCABS)
def test_the_bound_is_reached_by_ids_at_the_top_end(v):
    for n in sorted({1, 2, min(v, 24), min(v, 100), v if v < 100 else 1}):
        assert _bits_ref(np.arange(v - n, v), v) == int(si.ef_bits_bound(n, v))
        assert int(si.ef_bits_bound(n, v)) == n * _low_ref(n, v) + n + ((v - 1) >> _low_ref(n, v))


def test_the_issue_example_at_qwen_vocabulary():
    # n = 24 at 151,646: L = 12, at most 24 * 12 + 24 + 37 = 349 bits against 24 * 18 = 432
    assert int(si.ef_bits_bound(24, 151_646)) == 349


@pytest.mark.parametrize("v,k", [(151_646, 24), (151_646, 32), (4096, 32), (5, 5), (2 ** 20, 7)])
def test_mean_bound_holds_for_any_count_distribution(v, k):
    rng = np.random.default_rng(k)
    f = si.ef_bits_bound(np.arange(1, k + 1), v).astype(np.float64)
    assert si.ef_mean_bits_bound(k, k, v) == f[-1]  # every token full: the exact worst case
    for _ in range(300):
        counts = rng.integers(1, k + 1, size=int(rng.integers(1, 50)))
        if rng.random() < 0.3:  # two-point mixtures: the hardest case for a concave envelope
            counts = rng.choice(rng.integers(1, k + 1, size=2), size=counts.size)
        worst = f[counts - 1].mean()
        assert worst <= si.ef_mean_bits_bound(counts.mean(), k, v) + 1e-9
    for n in range(1, k + 1):
        assert si.ef_mean_bits_bound(n, k, v) >= f[n - 1]


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 12, 18, 20, 56, 60])
def test_pack_bits_round_trip_on_both_paths(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=1001, dtype=np.int64)
    values[:2] = [0, (1 << bits) - 1]
    buf = si.pack_bits(values, bits)
    assert len(buf) == math.ceil(1001 * bits / 8)
    assert np.array_equal(si.unpack_bits(buf, 1001, bits), values)


def test_pack_varbits_round_trip_with_zero_and_wide_widths():
    rng = np.random.default_rng(5)
    for top in (0, 1, 13, 56, 60):
        widths = rng.integers(0, top + 1, size=777)
        values = np.array([int(rng.integers(0, 1 << int(w))) if w else 0 for w in widths])
        buf = si.pack_varbits(values, widths)
        assert len(buf) == math.ceil(widths.sum() / 8)
        assert np.array_equal(si.unpack_varbits(buf, widths), values)


def test_ids_outside_the_vocabulary_and_corrupt_streams_are_refused():
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        si.ef_encode(np.array([3, 10]), np.array([2]), 10)
    counts, _, low, high = _encode([np.array([1, 7]), np.array([4])], 10)
    with pytest.raises(ValueError, match="high stream holds 3 entries, the counts say 4"):
        si.ef_decode(low, high, np.array([2, 2]), 10)


def test_position_bits():
    assert [si.position_bits(k) for k in (1, 2, 3, 16, 17, 24, 32)] == [0, 1, 2, 4, 5, 5, 5]
