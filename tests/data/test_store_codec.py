"""Format 2's encoding (data/store_codec.py) against references written here from dense
distributions (torch.log_softmax in float64): adaptive coverage, the exact rest bucket, the
quantisation bound docs/offline_teacher.md states, bit packing, chunk frames; both id codecs
(packed, ef), ef against packed (the same (id, log-probability) pairs per token), and chunks
written by the code before the ef id codec existed (their bytes below) still decoding."""

import json
import math
import zlib

import numpy as np
import pytest
import torch

from megatron_ddk.data import store_codec as sc

V, S = 300, 40
ID_CODECS = ["packed", "ef"]


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


def _pairs(ids, lp, t):
    """Token t's stored (id, log-probability) pairs as a sorted list (padding left out)."""
    keep = ids[t] >= 0
    return sorted(zip(ids[t][keep].tolist(), lp[t][keep].tolist()))


def _bound_check(logp: torch.Tensor, enc: sc.StoreEncoding):
    ids, vals, rest = _topk(logp, enc.top_k)
    payload = sc.encode_sample(ids, vals.astype(np.float32), rest.astype(np.float32), enc)
    got_ids, got_lp, got_rest = sc.decode_sample(payload, S, enc)
    counts = (got_ids >= 0).sum(-1)
    assert np.array_equal(counts, sc.adaptive_counts(vals.astype(np.float32), enc.top_p))
    delta = sc.delta_bound(vals.astype(np.float32), counts, enc.code_bits)
    for t in range(S):
        n = counts[t]
        # the kept ids (ef: entries of equal code may come in another order among themselves)
        assert sorted(got_ids[t, :n]) == sorted(ids[t, :n]) and (got_ids[t, n:] == -1).all()
        assert (np.diff(got_lp[t, :n]) <= 0).all(), "rank order: descending log-probabilities"
        true = logp[t, torch.as_tensor(got_ids[t, :n])].numpy()  # the dense teacher, float64
        true_rest = float(logp[t].scatter(0, torch.as_tensor(got_ids[t, :n]),
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


@pytest.mark.parametrize("id_codec", ID_CODECS)
@pytest.mark.parametrize("bits", [2, 4, 8, 12])
@pytest.mark.parametrize("scale,top_p", [(0.5, 1.0), (3.0, 0.95), (8.0, 0.9)])
def test_quantisation_error_within_the_documented_bound(bits, scale, top_p, id_codec):
    enc = sc.StoreEncoding(vocab_size=V, top_k=32, top_p=top_p, logprob_codec=f"q{bits}",
                           id_codec=id_codec)
    delta = _bound_check(_dense(bits, scale), enc)
    assert delta.max() > 0  # the bound is not vacuous


@pytest.mark.parametrize("id_codec", ID_CODECS)
def test_float32_codec_with_every_entry_is_lossless(id_codec):
    logp = _dense(7, 2.0).float()
    enc = sc.StoreEncoding(vocab_size=V, top_k=V, top_p=1.0, logprob_codec="float32",
                           id_codec=id_codec)
    ids, vals, rest = _topk(logp, V)
    got_ids, got_lp, got_rest = sc.decode_sample(sc.encode_sample(ids, vals, rest, enc), S, enc)
    assert all(len(np.unique(v)) == V for v in vals)  # no ties: the rank order is unique
    assert np.array_equal(got_ids, ids) and np.array_equal(got_lp, vals)
    assert np.all(np.isneginf(got_rest)), "K = vocabulary leaves no rest"


def test_payload_size_matches_the_formula():
    logp = _dense(3, 3.0)
    enc = sc.StoreEncoding(vocab_size=151_646, top_k=32, top_p=0.9, logprob_codec="q8",
                           id_codec="packed")
    ids, vals, rest = _topk(logp, 32)
    payload = sc.encode_sample(ids, vals, rest, enc)
    counts = sc.adaptive_counts(vals, 0.9)
    assert len(payload) == sc.payload_bytes(counts, enc)
    per_token = sc.bytes_per_token(counts.mean(), 151_646, "q8", 32)
    assert per_token == pytest.approx(len(payload) / S, abs=2.0 / S)  # byte padding only
    assert sc.bytes_per_token(32, 151_646, "q8", 32) == 1 + 4 + 2 + 32 * 18 / 8 + 31


def test_frames_name_other_encodings_and_damage():
    enc = sc.StoreEncoding(vocab_size=V)
    chunk = sc.frame_chunk(b"abc", enc)
    assert sc.unframe_chunk(chunk, enc) == b"abc"
    for other in (sc.StoreEncoding(vocab_size=V, logprob_codec="q4"),
                  sc.StoreEncoding(vocab_size=V, id_codec="ef")):
        with pytest.raises(ValueError, match=r"rowX: written by format 2 encoding tag .* header "
                                             r"says"):
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
                            compression="lz4", id_codec="rice").errors()
    assert len(errs) == 5 and errs[0].startswith("top_k=0") and "q2 .. q12" in errs[2]
    assert errs[4] == "id_codec='rice': use packed or ef"


@pytest.mark.parametrize("id_codec", ID_CODECS)
@pytest.mark.parametrize("top_p", [0.95, 1.0])
def test_entries_past_top_k_join_the_rest(id_codec, top_p):
    logp = _dense(5, 2.0)
    enc = sc.StoreEncoding(vocab_size=V, top_k=8, top_p=top_p, logprob_codec="q8",
                           id_codec=id_codec)
    wide = _topk(logp, 32)
    narrow = _topk(logp, 8)
    assert sc.encode_sample(*wide, enc) == sc.encode_sample(*narrow, enc)


# ------------------------------------------------------------------------------ ef vs packed
def _random_topk(rng, v: int, k: int, s: int, ties: bool):
    """[s, k] descending log-probabilities over distinct random ids (both ends of the range
    included in some tokens), their rest; `ties` repeats values (as quantisation would)."""
    ids = np.stack([rng.choice(v, k, replace=False) for _ in range(s)])
    if k >= 2:
        ids[::3, 0], ids[::3, 1] = 0, v - 1
    z = rng.normal(size=(s, k)) * 2
    if ties:
        z = np.round(z)
    vals = -np.sort(-z, axis=1)
    total = np.log(np.exp(vals).sum(1, keepdims=True)) + 0.05  # the rest keeps 1 - e^-0.05
    vals = vals - total
    rest = np.log1p(-np.exp(vals).sum(1))
    return ids, vals.astype(np.float32), rest.astype(np.float32)


@pytest.mark.parametrize("codec", ["float32", "float16", "q4", "q8", "q12"])
@pytest.mark.parametrize("top_p", [1.0, 0.7])
@pytest.mark.parametrize("v", [2, 5, 4096, 151_646, 2 ** 20])
def test_ef_decodes_to_the_pairs_packed_decodes_to(codec, top_p, v):
    rng = np.random.default_rng(v + len(codec))
    for k in sorted({1, min(v, 3), min(v, 24)}):
        ids, vals, rest = _random_topk(rng, v, k, 64, ties=k > 3)
        out = {}
        for id_codec in ID_CODECS:
            enc = sc.StoreEncoding(vocab_size=v, top_k=k, top_p=top_p, logprob_codec=codec,
                                   id_codec=id_codec)
            payload = sc.encode_sample(ids, vals, rest, enc)
            out[id_codec] = sc.decode_sample(payload, 64, enc)
            if id_codec == "ef":
                assert len(payload) <= sc.payload_bytes(sc.sample_counts(payload, 64, enc), enc)
        (pi, pl, pr), (ei, el, er) = out["packed"], out["ef"]
        assert np.array_equal(pr, er)
        counts = sc.adaptive_counts(vals, top_p)
        for t in range(64):
            assert _pairs(pi, pl, t) == _pairs(ei, el, t), (k, t)  # exactly the same pairs
            n = counts[t]
            assert sorted(ei[t, :n]) == sorted(ids[t, :n])  # and the input's ids
            assert (np.diff(el[t, :n]) <= 0).all()  # in rank order
            if codec == "float32":
                assert _pairs(ei, el, t) == sorted(zip(ids[t, :n].tolist(),
                                                       vals[t, :n].tolist()))
            # the log-probabilities in rank order are the same sequence (only tied ids may move)
            assert np.array_equal(pl[t], el[t])


@pytest.mark.parametrize("v", [4096, 151_646])
@pytest.mark.parametrize("codec,k", [("q4", 24), ("q8", 24), ("q8", 32), ("q4", 16),
                                     ("float16", 24)])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_ef_size_never_exceeds_the_stated_bound(v, codec, k, top_p):
    rng = np.random.default_rng(k)
    enc = sc.StoreEncoding(vocab_size=v, top_k=k, top_p=top_p, logprob_codec=codec,
                           id_codec="ef")
    spread = np.linspace(0, v - 1, k).round().astype(np.int64)
    cases = {"random": _random_topk(rng, v, k, S, ties=False)[0],
             "spread": np.tile(rng.permutation(spread), (S, 1)),  # evenly over the vocabulary
             "top": np.tile(np.arange(v - k, v)[::-1], (S, 1))}  # all at the top end
    _, vals, rest = _random_topk(rng, v, k, S, ties=False)
    for name, ids in cases.items():
        payload = sc.encode_sample(ids, vals, rest, enc)
        counts = sc.sample_counts(payload, S, enc)
        bound = sc.payload_bytes(counts, enc)
        assert len(payload) <= bound, name
        # the per-token formula from (n, V) alone, with at most 4 bytes of padding per sample
        per_token = sc.bytes_per_token(counts.mean(), v, codec, k, top_p, "ef")
        assert bound <= per_token * S + 4, name
        if name == "top" and top_p >= 1:  # the worst case is reached, to the padding
            assert len(payload) == bound, name
    packed = sc.bytes_per_token(k, v, codec, k, 1.0, "packed")
    assert sc.bytes_per_token(k, v, codec, k, 1.0, "ef") < packed


def test_default_setting_at_qwen_vocabulary():
    # K = 24, q4, top_p 1: no counts, rest 4 + step 2, ids <= 349 bits, codes 24 x 4 bits
    ef = sc.bytes_per_token(24, 151_646, "q4", 24, 1.0, "ef")
    assert ef == 4 + 2 + (349 + 96) / 8 == 61.625
    assert sc.bytes_per_token(24, 151_646, "q4", 24, 1.0, "packed") == 72.5
    # the default, K = 16 + 8 tail draws: head ids 16 x 13 + 16 + (151,645 >> 13) = 242 bits,
    # codes 16 x 4, tail 8 x 14 + 8 + (151,645 >> 14) = 129 bits
    assert (sc.DEFAULT_TOP_K, sc.DEFAULT_TAIL_SAMPLES, sc.DEFAULT_LOGPROB_CODEC) == (16, 8, "q4")
    default = sc.bytes_per_token(16, 151_646, "q4", 16, 1.0, "ef", 8)
    assert default == 4 + 2 + (242 + 64 + 129) / 8 == 60.375
    assert default <= 196 / 3


def test_top_entry_code_or_position_whichever_is_smaller():
    v, k = 4096, 24  # ceil(log2 24) = 5 bits of position against b bits of code
    assert not sc.StoreEncoding(v, k, logprob_codec="q4", id_codec="ef").top_position
    assert not sc.StoreEncoding(v, 32, logprob_codec="q5", id_codec="ef").top_position
    assert sc.StoreEncoding(v, k, logprob_codec="q8", id_codec="ef").top_position
    assert not sc.StoreEncoding(v, k, logprob_codec="q8").top_position  # packed: never stored
    rng = np.random.default_rng(3)
    ids, vals, rest = _random_topk(rng, v, k, S, ties=False)
    sizes = {}
    for codec in ("q4", "q8"):
        enc = sc.StoreEncoding(v, k, 1.0, codec, id_codec="ef")
        sizes[codec] = len(sc.encode_sample(ids, vals, rest, enc))
    # q8 stores 23 codes + a 5-bit index per token, q4 all 24 codes
    assert sizes["q8"] - sizes["q4"] == math.ceil(S * (23 * 8 + 5) / 8) - S * 24 * 4 // 8


def test_ef_with_top_p_1_stores_no_counts():
    rng = np.random.default_rng(4)
    ids, vals, rest = _random_topk(rng, V, 8, S, ties=False)
    full = sc.StoreEncoding(V, 8, 1.0, "q4", id_codec="ef")
    adaptive = sc.StoreEncoding(V, 8, 0.999999, "q4", id_codec="ef")
    assert not full.stores_counts and adaptive.stores_counts
    a, b = sc.encode_sample(ids, vals, rest, full), sc.encode_sample(ids, vals, rest, adaptive)
    assert len(b) - len(a) == S  # one uint8 per token
    assert np.array_equal(sc.sample_counts(a, S, full), np.full(S, 8))
    with pytest.raises(ValueError, match="needs top_k=8"):
        sc.encode_sample(ids[:, :5], vals[:, :5], rest, full)


def test_tag_of_packed_is_the_tag_before_id_codec_existed():
    old = {"vocab_size": V, "top_k": 24, "top_p": 1.0, "logprob_codec": "q4",
           "compression": "none", "zstd_level": 3}  # the encoding's fields before ef
    packed = sc.StoreEncoding(V, 24, 1.0, "q4")
    assert packed.tag == zlib.crc32(json.dumps(old, sort_keys=True).encode())
    assert sc.StoreEncoding.from_dict(dict(old, id_bits=9, format_version=2)) == packed
    ef = sc.StoreEncoding(V, 24, 1.0, "q4", id_codec="ef")
    assert ef.tag != packed.tag and sc.StoreEncoding.from_dict(ef.to_dict()) == ef


# Chunks written by the codec before the ef id codec existed (commit ae5564b), from
# V = 300, K = 5 and 3 tokens: the header's encoding then, the chunk's bytes, what it decoded to.
_OLD_IDS = [[279, 160, 106, 97, 214], [127, 83, 88, 262, 112], [60, 209, 161, 286, 249]]
_OLD_REST = [-0.5717979669570923, -0.8085299730300903, -0.530055046081543]
OLD_CHUNKS = {
    "q8": ({"vocab_size": 300, "top_k": 5, "top_p": 0.9, "logprob_codec": "q8",
            "compression": "none", "zstd_level": 3, "id_bits": 9, "format_version": 2},
           "44444b54020000009712e817320000000505055a6112bfd2fb4ebfb0b107bf281f4d1ee51c1741a909"
           "63edcf142c06e1f08816ca633eca1b1505068363133816ae03",
           [[-1.412445068359375, -2.824127197265625, -3.0128173828125, -3.159576416015625,
             -3.19451904296875],
            [-1.632280945777893, -1.6691995859146118, -2.4752566814422607, -3.08441424369812,
             -3.2013232707977295],
            [-2.003051996231079, -2.270721673965454, -2.375877618789673, -3.2075655460357666,
             -3.221904993057251]]),
    "float16": ({"vocab_size": 300, "top_k": 5, "top_p": 1.0, "logprob_codec": "float16",
                 "compression": "none", "zstd_level": 3, "id_bits": 9, "format_version": 2},
                "44444b5402000000113b8e1e3e0000000505055a6112bfd2fb4ebfb0b107bf1741a90963edcf14"
                "2c06e1f08816ca633ea6bda6c108c251c263c288beadbef2c02cc267c201c08bc0c0c06ac271c2",
                [[-1.412109375, -2.82421875, -3.015625, -3.158203125, -3.193359375],
                 [-1.6328125, -1.6689453125, -2.47265625, -3.0859375, -3.201171875],
                 [-2.001953125, -2.271484375, -2.375, -3.20703125, -3.220703125]]),
}


@pytest.mark.parametrize("codec", list(OLD_CHUNKS))
def test_chunks_written_before_ef_still_decode(codec):
    header_encoding, chunk, logp = OLD_CHUNKS[codec]
    enc = sc.StoreEncoding.from_dict(header_encoding)
    assert enc.id_codec == "packed"
    ids, got, rest = sc.decode_sample(sc.unframe_chunk(bytes.fromhex(chunk), enc), 3, enc)
    assert ids.tolist() == _OLD_IDS and got.tolist() == logp and rest.tolist() == _OLD_REST
    ef = sc.StoreEncoding.from_dict(dict(header_encoding, id_codec="ef"))
    with pytest.raises(ValueError, match="encoding tag"):  # an ef header names such a chunk
        sc.unframe_chunk(bytes.fromhex(chunk), ef)
