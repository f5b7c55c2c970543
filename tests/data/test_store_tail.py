"""Format 2's tail samples (data/store_tail.py through store_codec's encode / decode), against
references written here: distinct drawn ids weighted c_v R / M, sums of 1, sizes, errors."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from megatron_ddk.data.store_codec import (
    StoreEncoding,
    bytes_per_token,
    decode_sample,
    encode_sample,
    payload_bytes,
)

V, S, K, M = 5000, 9, 7, 6


def _sample(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(S, V)) * 2.5
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :K]
    vals = np.take_along_axis(lp, ids, 1)
    rest = np.log1p(-np.exp(vals).sum(1))
    tail = np.sort(rng.choice(np.arange(K, V), size=(S, M)), axis=1)  # repeats on purpose
    tail[0] = tail[0, 0]  # one token draws a single id M times
    rest[-1] = -np.inf  # one token with no tail mass
    return ids, vals, rest, tail


@pytest.mark.parametrize("id_codec", ["packed", "ef"])
@pytest.mark.parametrize("codec", ["float32", "q4"])
def test_tail_decodes_to_distinct_ids_weighted_by_their_draws(id_codec, codec):
    ids, vals, rest, tail = _sample()
    enc = StoreEncoding(vocab_size=V, top_k=K, logprob_codec=codec, id_codec=id_codec,
                        tail_samples=M)
    payload = encode_sample(ids, vals, rest, enc, tail)
    bound = payload_bytes(np.full(S, K), enc)  # exact for packed, the most for ef's head ids
    assert len(payload) == bound if id_codec == "packed" else len(payload) <= bound
    got_ids, got_lp, got_rest = decode_sample(payload, S, enc)
    assert got_ids.shape == got_lp.shape == (S, K + M)
    assert np.all(got_rest == -np.inf)
    for t in range(S):
        tail_part = got_ids[t, K:]
        if not np.isfinite(rest[t]):
            assert (tail_part == -1).all()
            continue
        uniq, hits = np.unique(tail[t], return_counts=True)
        n = len(uniq)
        assert np.array_equal(tail_part[:n], uniq) and (tail_part[n:] == -1).all()
        want = rest[t] + np.log(hits / M)
        assert np.allclose(got_lp[t, K:K + n], want, rtol=0, atol=1e-6)
        assert np.isclose(np.exp(got_lp[t].astype(np.float64)).sum(), 1.0, atol=1e-6)


def test_sizes_add_the_tail_section():
    for id_codec, bits in (("packed", M * 13), ("ef", None)):
        base = bytes_per_token(K, V, "q4", K, 1.0, id_codec)
        with_tail = bytes_per_token(K, V, "q4", K, 1.0, id_codec, M)
        if bits is not None:
            assert with_tail - base == pytest.approx(bits / 8)  # 13 bits per id at V = 5000
        else:  # Elias-Fano bound of M ids: M L + M + ((V - 1) >> L), L = floor(log2(V / M))
            low = int(np.floor(np.log2(V / M)))
            bound = M * low + M + ((V - 1) >> low)
            assert with_tail - base == pytest.approx(bound / 8)


def test_old_encoding_tags_do_not_change():
    enc = StoreEncoding(vocab_size=V, top_k=K, logprob_codec="q4", id_codec="ef")
    fields = {"vocab_size": V, "top_k": K, "top_p": 1.0, "logprob_codec": "q4",
              "compression": "none", "zstd_level": 3, "id_codec": "ef"}
    assert enc.tag == zlib.crc32(json.dumps(fields, sort_keys=True).encode())
    assert StoreEncoding.from_dict(fields) == enc and enc.tail_samples == 0
    assert StoreEncoding(vocab_size=V, top_k=K, logprob_codec="q4", id_codec="ef",
                         tail_samples=M).tag != enc.tag  # a tail shard mixed in is named


def test_bad_tail_settings_are_named():
    errs = StoreEncoding(vocab_size=V, top_k=K, top_p=0.9, tail_samples=M).errors()
    assert any("tail_samples" in e and "top_p" in e for e in errs), errs
    assert any("tail_samples=-1" in e
               for e in StoreEncoding(vocab_size=V, top_k=K, tail_samples=-1).errors())
    ids, vals, rest, tail = _sample()
    enc = StoreEncoding(vocab_size=V, top_k=K, id_codec="ef", tail_samples=M)
    with pytest.raises(ValueError, match="tail_samples=6"):
        encode_sample(ids, vals, rest, enc)  # no tail ids
    with pytest.raises(ValueError, match="ascending"):
        encode_sample(ids, vals, rest, enc, tail[:, ::-1])
    with pytest.raises(ValueError, match=r"\[0, 5000\)"):
        encode_sample(ids, vals, rest, enc, tail + V)


def test_the_producer_default_draws_only_where_there_is_an_uncovered_tail():
    from megatron_ddk.training.teacher_cache import _encoding, default_tail_samples

    assert default_tail_samples(2, 16, 1.0, 4096) == 8
    assert default_tail_samples(2, 16, 0.95, 4096) == 0  # top_p moves mass the draws miss
    assert default_tail_samples(2, 4096, 1.0, 4096) == 0  # K covers the vocabulary: no tail
    assert default_tail_samples(1, 16, 1.0, 4096) == 0  # format 1 has no tail section
    with pytest.raises(ValueError, match="--tail-samples=8: needs top_p 1"):
        _encoding(None, None, 4096, 16, 0.9, "q4", "none", "ef", 8)
    with pytest.raises(ValueError, match="format 1 stores no tail samples"):
        _encoding(1, None, 4096, 16, 1.0, "q4", "none", "ef", 8)
