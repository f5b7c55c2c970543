"""The token-id coding of the offline teacher store's format 2: pure numpy, no I/O.

Two id codecs (StoreEncoding.id_codec, data/store_codec.py):

- packed: every id in id_bits(vocab) = ceil(log2(vocab)) bits, in rank order (18 bits at a
  151,646-token vocabulary);
- ef (Elias-Fano): a token's n ids as a set, in ascending id order, with
  L = max(0, floor(log2(vocab / n))) low bits each (derived from n and the vocabulary, not
  stored) in one stream, and the high parts h_i = id_i >> L in unary in another: per id, in
  ascending order, (h_i - h_{i-1}) zeros and then a one (h_{-1} = 0), so a token's high part
  ends at its last one and takes n + h_last bits. Whatever the ids, a token takes at most
  ef_bits_bound(n, vocab) = n L + n + ((vocab - 1) >> L) bits (349 for n = 24 at 151,646,
  against 432 packed); the bound is reached when the largest id is vocab - 1.

A sample's tokens are concatenated into each stream, and every stream decodes with vectorised
numpy (no loop over tokens): the high stream's ones are the entries in order, token t's part
starts one bit after the last one of token t - 1, and h_i = position_i - start_t - i (i: the
entry's index within its token).

Imports numpy only; must not import torch, models, losses or training.
"""

from __future__ import annotations

import math

import numpy as np

ID_CODECS = ("packed", "ef")


# ------------------------------------------------------------------------------ fixed width
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers < 2**bits packed little-endian, `bits` each (last byte padded)."""
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if bits <= 0 or v.size == 0:
        return b""
    shifts = np.arange(bits, dtype=np.uint64)
    bitmat = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf, count: int, bits: int) -> np.ndarray:
    """Inverse of pack_bits: `count` integers of `bits` bits each, as int64."""
    if bits <= 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    raw = np.frombuffer(buf, dtype=np.uint8)
    need = -(-count * bits // 8)
    if raw.size < need:
        raise ValueError(f"bit-packed block holds {raw.size} bytes, {need} needed")
    if 8 < bits <= 56:  # one gather per value beats the bit matrix here
        return _extract(raw[:need], np.arange(count, dtype=np.int64) * bits,
                        np.full(count, bits, dtype=np.int64))
    bitmat = np.unpackbits(raw[:need], count=count * bits, bitorder="little").reshape(count, bits)
    return bitmat.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def _extract(raw: np.ndarray, offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The little-endian bit fields (offsets, widths <= 56) of byte array `raw`, as int64: each
    from the 8 bytes at its first byte, read as one (unaligned) uint64: one gather per field."""
    pad = np.zeros(raw.size + 8, dtype=np.uint8)
    pad[:raw.size] = raw
    words = np.ndarray((raw.size + 1,), dtype="<u8", buffer=pad, strides=(1,))[offsets >> 3]
    one = np.uint64(1)
    masks = (one << widths.astype(np.uint64)) - one
    return ((words >> (offsets & 7).astype(np.uint64)) & masks).astype(np.int64)


# ------------------------------------------------------------------------------ variable width
def pack_varbits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """values[e] in widths[e] bits each (little-endian, concatenated, last byte padded)."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    w = np.asarray(widths, dtype=np.int64).reshape(-1)
    top = int(w.max()) if w.size else 0
    if top <= 0:
        return b""
    shifts = np.arange(top, dtype=np.uint64)
    bitmat = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bitmat[shifts[None, :] < w[:, None].astype(np.uint64)],
                       bitorder="little").tobytes()


def unpack_varbits(buf, widths: np.ndarray) -> np.ndarray:
    """Inverse of pack_varbits: one int64 per entry of `widths`."""
    w = np.asarray(widths, dtype=np.int64).reshape(-1)
    total, top = int(w.sum()), int(w.max()) if w.size else 0
    if total == 0:
        return np.zeros(w.size, dtype=np.int64)
    raw = np.frombuffer(buf, dtype=np.uint8)
    need = -(-total // 8)
    if raw.size < need:
        raise ValueError(f"bit-packed block holds {raw.size} bytes, {need} needed")
    if top <= 56:
        return _extract(raw[:need], np.cumsum(w) - w, w)
    bits = np.unpackbits(raw[:need], count=total, bitorder="little")
    mask = np.arange(top)[None, :] < w[:, None]
    bitmat = np.zeros((w.size, top), dtype=np.int64)
    bitmat[mask] = bits
    return bitmat @ (np.int64(1) << np.arange(top, dtype=np.int64))


# ------------------------------------------------------------------------------ Elias-Fano
def ef_low_bits(counts, vocab_size: int) -> np.ndarray:
    """[s] L = max(0, floor(log2(vocab / n))) per token of n = counts ids (exact integers)."""
    q = np.int64(vocab_size) // np.maximum(np.asarray(counts, dtype=np.int64), 1)
    # frexp is exact: q = m 2^e with 0.5 <= m < 1, so floor(log2 q) = e - 1 (q >= 1, < 2^53)
    return (np.frexp(q.astype(np.float64))[1] - 1).astype(np.int64)


def ef_bits_bound(n, vocab_size: int):
    """Most bits a token of n distinct ids < vocab_size takes under ef, whatever the ids:
    n L + n + ((vocab_size - 1) >> L), reached when the largest id is vocab_size - 1."""
    n = np.asarray(n, dtype=np.int64)
    low = ef_low_bits(n, vocab_size)
    return np.where(n > 0, n * low + n + ((vocab_size - 1) >> low), 0)


def ef_mean_bits_bound(mean_entries: float, top_k: int, vocab_size: int) -> float:
    """Most mean bits per token under ef for tokens of 1..top_k ids whose mean count is
    `mean_entries`, whatever the ids and the counts: the least concave majorant of
    ef_bits_bound over n = 1..top_k at the mean (Jensen). Equal to ef_bits_bound when every
    token holds top_k ids (top_p >= 1)."""
    k = max(1, int(top_k))
    x = min(max(float(mean_entries), 1.0), float(k))
    if x >= k:
        return float(ef_bits_bound(k, vocab_size))
    n = np.arange(1, k + 1, dtype=np.int64)
    f = ef_bits_bound(n, vocab_size).astype(np.float64)
    hull = [0]  # upper hull (monotone chain) of the points (n, f(n))
    for i in range(1, k):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (f[b] - f[a]) * (n[i] - n[a]) <= (f[i] - f[a]) * (n[b] - n[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    xs, ys = n[hull].astype(np.float64), f[hull]
    return float(np.interp(x, xs, ys))


def ef_encode(ids_sorted: np.ndarray, counts: np.ndarray, vocab_size: int):
    """(low stream, high stream) bytes of a sample's ids: [E] ids ascending within each token
    (tokens in order), counts [s] ids per token."""
    counts = np.asarray(counts, dtype=np.int64)
    ids = np.asarray(ids_sorted, dtype=np.int64)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}) for the ef id codec, got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    low_bits = ef_low_bits(counts, vocab_size)
    token = np.repeat(np.arange(counts.size), counts)
    width = low_bits[token]
    low = ids & ((np.int64(1) << width) - 1)
    high = ids >> width
    starts = np.cumsum(counts) - counts
    local = np.arange(ids.size) - starts[token]
    last = np.zeros(counts.size, dtype=np.int64)
    has = counts > 0
    last[has] = high[np.cumsum(counts)[has] - 1]
    length = counts + last  # a token's high part: n ones and h_last zeros
    first_bit = np.cumsum(length) - length
    bits = np.zeros(int(length.sum()), dtype=np.uint8)
    bits[first_bit[token] + high + local] = 1
    return pack_varbits(low, width), np.packbits(bits, bitorder="little").tobytes()


def ef_low_bytes(counts: np.ndarray, vocab_size: int) -> int:
    """Bytes of a sample's low stream (fixed by the counts and the vocabulary)."""
    counts = np.asarray(counts, dtype=np.int64)
    return -(-int((counts * ef_low_bits(counts, vocab_size)).sum()) // 8)


def ef_decode(low_buf, high_buf, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """[E] ids (ascending within each token) of ef_encode's two streams."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    low_bits = ef_low_bits(counts, vocab_size)
    token = np.repeat(np.arange(counts.size), counts)
    width = low_bits[token]
    low = unpack_varbits(low_buf, width)
    bits = np.unpackbits(np.frombuffer(high_buf, dtype=np.uint8), bitorder="little")
    pos = np.flatnonzero(bits)
    if pos.size != total:
        raise ValueError(f"Elias-Fano high stream holds {pos.size} entries, the counts say "
                         f"{total} (corrupt payload)")
    ends = np.cumsum(counts)
    starts = ends - counts
    first_bit = np.zeros(counts.size, dtype=np.int64)  # one past the last one before token t
    after = starts > 0
    first_bit[after] = pos[starts[after] - 1] + 1
    local = np.arange(total) - starts[token]
    high = pos - first_bit[token] - local
    ids = (high << width) | low
    if total and (int(high.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError("Elias-Fano ids outside the vocabulary (corrupt payload)")
    return ids


def ef_sample_bytes_bound(counts: np.ndarray, vocab_size: int) -> int:
    """Most bytes of a sample's two id streams, whatever its ids (each stream byte-padded)."""
    counts = np.asarray(counts, dtype=np.int64)
    high = int(np.where(counts > 0, counts + ((vocab_size - 1) >> ef_low_bits(counts, vocab_size)),
                        0).sum())
    return ef_low_bytes(counts, vocab_size) + -(-high // 8)


def position_bits(top_k: int) -> int:
    """Bits of an entry's index among a token's at most top_k entries: ceil(log2(top_k))."""
    return max(0, math.ceil(math.log2(max(1, int(top_k)))))
