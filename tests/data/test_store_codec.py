"""Format 2's encoding (data/store_codec.py) against references written here from dense
distributions (torch.log_softmax in float64): adaptive coverage, the exact rest bucket, the
quantisation bound docs/offline_teacher.md states, bit packing, chunk frames."""

import math

import numpy as np
import pytest
import torch

from megatron_ddk.data import store_codec as sc

V, S = 300, 40


def _dense(seed: int, scale: float) -> torch.Tensor:
    """[S, V] float64 log-probabilities; `scale` sets how sharp they are."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(S, V, generator=g, dtype=torch.float64) * scale, -1)


def _topk(logp: torch.Tensor, k: int):
    vals, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids.numpy(), vals.numpy(), rest.numpy()


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 18, 20])
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=1001)
    buf = sc.pack_bits(values, bits)
    assert len(buf) == math.ceil(1001 * bits / 8)
    assert np.array_equal(sc.unpack_bits(buf, 1001, bits), values)


def test_id_bits_of_vocabularies():
    assert sc.StoreEncoding(vocab_size=151_646).id_bits == 18
    assert sc.StoreEncoding(vocab_size=4096).id_bits == 12
    assert sc.StoreEncoding(vocab_size=4097).id_bits == 13


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_adaptive_counts_and_rest_against_the_dense_distribution(top_p):
    logp = _dense(1, 2.5)
    ids, vals, rest = _topk(logp, 32)
    counts = sc.adaptive_counts(vals, top_p)
    new_rest = sc.fold_rest(vals, rest, counts)
    probs = logp.exp()
    for t in range(S):  # the fewest top entries reaching top_p (or all 32)
        order = probs[t].sort(descending=True).values
        cum = order.cumsum(0)
        want = min(32, int((cum < top_p).sum()) + 1)
        assert counts[t] == want, t
        kept = torch.as_tensor(ids[t, :want])
        outside = logp[t].scatter(0, kept, float("-inf")).logsumexp(0)
        assert new_rest[t] == pytest.approx(float(outside), abs=1e-12)


def _bound_check(logp: torch.Tensor, enc: sc.StoreEncoding):
    ids, vals, rest = _topk(logp, enc.top_k)
    payload = sc.encode_sample(ids, vals.astype(np.float32), rest.astype(np.float32), enc)
    got_ids, got_lp, got_rest = sc.decode_sample(payload, S, enc)
    counts = (got_ids >= 0).sum(-1)
    assert np.array_equal(counts, sc.adaptive_counts(vals.astype(np.float32), enc.top_p))
    delta = sc.delta_bound(vals.astype(np.float32), counts, enc.code_bits)
    for t in range(S):
        n = counts[t]
        assert np.array_equal(got_ids[t, :n], ids[t, :n]) and (got_ids[t, n:] == -1).all()
        true = logp[t, torch.as_tensor(ids[t, :n])].numpy()  # the dense teacher, float64
        true_rest = float(logp[t].scatter(0, torch.as_tensor(ids[t, :n]),
                                          float("-inf")).logsumexp(0))
        mine = got_lp[t, :n].astype(np.float64)
        # the rest mass is exact (float32); each entry within Delta (+ float32 rounding)
        assert got_rest[t] == pytest.approx(true_rest, rel=1e-6, abs=1e-6)
        err = np.abs(mine - true).max()
        assert err <= delta[t] * (1 + 1e-6) + 1e-5, (t, err, delta[t])
        # the token's distribution sums to 1
        total = np.exp(mine).sum() + math.exp(float(got_rest[t]))
        assert total == pytest.approx(1.0, abs=1e-6)
        # KL(p || p_hat) over the n + 1 outcomes within the stated chi-square bound
        p = np.append(np.exp(true), math.exp(true_rest))
        q = np.append(np.exp(mine), math.exp(float(got_rest[t])))
        kl = float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)))
        bound = (1 - math.exp(true_rest)) * math.expm1(delta[t]) ** 2
        assert kl <= bound * (1 + 1e-3) + 1e-6, (t, kl, bound)
    return delta


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
@pytest.mark.parametrize("scale,top_p", [(0.5, 1.0), (3.0, 0.95), (8.0, 0.9)])
def test_quantisation_error_within_the_documented_bound(bits, scale, top_p):
    enc = sc.StoreEncoding(vocab_size=V, top_k=32, top_p=top_p, logprob_codec=f"q{bits}")
    delta = _bound_check(_dense(bits, scale), enc)
    assert delta.max() > 0  # the bound is not vacuous


def test_float32_codec_with_every_entry_is_lossless():
    logp = _dense(7, 2.0).float()
    enc = sc.StoreEncoding(vocab_size=V, top_k=V, top_p=1.0, logprob_codec="float32")
    ids, vals, rest = _topk(logp, V)
    got_ids, got_lp, got_rest = sc.decode_sample(sc.encode_sample(ids, vals, rest, enc), S, enc)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_lp, vals)
    assert np.all(np.isneginf(got_rest)), "K = vocabulary leaves no rest"


def test_payload_size_matches_the_formula():
    logp = _dense(3, 3.0)
    enc = sc.StoreEncoding(vocab_size=151_646, top_k=32, top_p=0.9, logprob_codec="q8")
    ids, vals, rest = _topk(logp, 32)
    payload = sc.encode_sample(ids, vals, rest, enc)
    counts = sc.adaptive_counts(vals, 0.9)
    assert len(payload) == sc.payload_bytes(counts, enc)
    per_token = sc.bytes_per_token(counts.mean(), 151_646, "q8", 32)
    assert per_token == pytest.approx(len(payload) / S, abs=2.0 / S)  # byte padding only
    assert sc.bytes_per_token(32, 151_646, "q8", 32) == 1 + 4 + 2 + 32 * 18 / 8 + 31


def test_frames_name_other_encodings_and_damage():
    enc = sc.StoreEncoding(vocab_size=V)
    other = sc.StoreEncoding(vocab_size=V, logprob_codec="q4")
    chunk = sc.frame_chunk(b"abc", enc)
    assert sc.unframe_chunk(chunk, enc) == b"abc"
    with pytest.raises(ValueError, match=r"rowX: written by format 2 encoding tag .* header says"):
        sc.unframe_chunk(chunk, other, where="rowX")
    with pytest.raises(ValueError, match="rowY: payload 2 bytes, frame says 3"):
        sc.unframe_chunk(chunk[:-1], enc, where="rowY")
    with pytest.raises(ValueError, match="not a teacher-store chunk"):
        sc.unframe_chunk(b"XXXX" + chunk[4:], enc)


def test_zstd_chunk_round_trip_or_named_extra():
    enc = sc.StoreEncoding(vocab_size=V, compression="zstd")
    try:
        comp, decomp = sc.codec_objects(enc)
    except ValueError as exc:
        assert "pip install 'megatron-ddk[formats]'" in str(exc)
        return
    payload = bytes(range(256)) * 8
    assert sc.unframe_chunk(sc.frame_chunk(payload, enc, comp), enc, decomp) == payload


def test_bad_settings_are_named():
    errs = sc.StoreEncoding(vocab_size=V, top_k=0, top_p=0.0, logprob_codec="q13",
                            compression="lz4").errors()
    assert len(errs) == 4 and errs[0].startswith("top_k=0") and "q2 .. q12" in errs[2]


def test_entries_past_top_k_join_the_rest():
    logp = _dense(5, 2.0)
    enc = sc.StoreEncoding(vocab_size=V, top_k=8, top_p=0.95, logprob_codec="q8")
    wide = _topk(logp, 32)
    narrow = _topk(logp, 8)
    assert sc.encode_sample(*wide, enc) == sc.encode_sample(*narrow, enc)
