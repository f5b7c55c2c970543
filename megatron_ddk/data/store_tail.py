"""The offline teacher store's tail samples (format 2, StoreEncoding.tail_samples = M > 0).

With tail samples a token keeps its top-K entries as usual and, in place of the single rest
bucket of mass R, M token ids drawn from the teacher's distribution outside those K
(losses/tail_sample.py: systematic draws, ascending ids, repeats allowed). Each draw stands for
mass R / M, so a token's decoded distribution is its K entries (renormalised to 1 - R as before)
plus its distinct drawn ids v with log-probability log(R) + log(c_v) - log(M), c_v the draws of
v, and no rest: it still sums to 1, and its expectation over the draws is the teacher's.

On disk, right after the per-token rest log-masses (which stay exact, float32), per sample:

  packed ids: [tail ids: s x M x id_bits bits]
  ef ids:     [low bits: s x M x L bits] [high bits in unary, padded to their bound]
              with L = max(0, floor(log2(vocab / M))) (store_ids.py; a multiset is coded like a
              set), the high stream always ef_sample_bytes_bound's size so the section has a
              fixed length.

A token whose rest is exactly 0 (-inf log-mass: K covers the vocabulary) has no tail: its draws
are stored as id 0 and ignored on decode.

Imports numpy and store_ids only; must not import torch, models, losses or training.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from megatron_ddk.data.store_ids import (
    ef_bits_bound,
    ef_decode,
    ef_encode,
    ef_low_bytes,
    ef_sample_bytes_bound,
    pack_bits,
    unpack_bits,
)


def tail_section_bytes(num_tokens: int, samples: int, vocab_size: int, id_codec: str,
                       id_bits: int) -> int:
    """Bytes of one sample's tail section (fixed by its size, M and the vocabulary)."""
    if samples <= 0:
        return 0
    if id_codec == "packed":
        return -(-num_tokens * samples * id_bits // 8)
    counts = np.full(num_tokens, samples, dtype=np.int64)
    return ef_sample_bytes_bound(counts, vocab_size)


def tail_bits_per_token(samples: int, vocab_size: int, id_codec: str, id_bits: int) -> float:
    """Bits per token of the tail section, byte padding of the sample aside (ef: its bound,
    M L + M + ((vocab - 1) >> L), which the section always takes)."""
    if samples <= 0:
        return 0.0
    if id_codec == "packed":
        return float(samples * id_bits)
    return float(ef_bits_bound(samples, vocab_size))


def encode_tail(tail_ids: np.ndarray, rest: np.ndarray, vocab_size: int, id_codec: str,
                id_bits: int) -> bytes:
    """The tail section of [s, M] drawn ids (ascending per token; any value where the token's
    rest is -inf) for the [s] rest log-masses."""
    s, m = tail_ids.shape
    ids = np.where(np.isfinite(rest)[:, None], np.asarray(tail_ids, np.int64), 0)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"tail ids must be in [0, {vocab_size}) where the rest has mass, got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if (np.diff(ids, axis=1) < 0).any():
        raise ValueError("tail ids must be ascending within each token (the sampler's order)")
    if id_codec == "packed":
        return pack_bits(ids.reshape(-1), id_bits)
    counts = np.full(s, m, dtype=np.int64)
    low, high = ef_encode(ids.reshape(-1), counts, vocab_size)
    size = tail_section_bytes(s, m, vocab_size, id_codec, id_bits)
    return low + high + bytes(size - len(low) - len(high))


def decode_tail(section, rest: np.ndarray, samples: int, vocab_size: int, id_codec: str,
                id_bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids [s, M] int64 padded with -1, log-probabilities [s, M] float32 padded with -inf):
    each token's distinct drawn ids, weighted by their draws (module docstring)."""
    s, m = rest.size, samples
    if id_codec == "packed":
        flat = unpack_bits(section, s * m, id_bits)
    else:
        counts = np.full(s, m, dtype=np.int64)
        n_low = ef_low_bytes(counts, vocab_size)
        flat = ef_decode(section[:n_low], section[n_low:], counts, vocab_size)
    draws = flat.reshape(s, m)
    if s and (np.diff(draws, axis=1) < 0).any():
        raise ValueError("tail ids not ascending within a token (corrupt payload)")
    new = np.ones((s, m), dtype=bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    has_tail = np.isfinite(rest)
    new &= has_tail[:, None]
    run = np.cumsum(new.reshape(-1)) - 1  # run index of every draw (distinct id in its token)
    runs = int(new.sum())
    hits = np.bincount(run[np.repeat(has_tail, m)], minlength=runs) if runs else \
        np.zeros(0, np.int64)
    token, slot = np.nonzero(new)
    position = np.cumsum(new, axis=1)[token, slot] - 1  # the run's place among its token's
    ids = np.full((s, m), -1, dtype=np.int64)
    logp = np.full((s, m), -np.inf, dtype=np.float32)
    ids[token, position] = draws[token, slot]
    logp[token, position] = (rest.astype(np.float64)[token] + np.log(hits) - np.log(m))
    return ids, logp
