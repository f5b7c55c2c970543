"""The offline teacher store's compact encoding (format 2): pure numpy, no I/O.

Per token the producer hands over the teacher's top-K (ids and log-probabilities in descending
order, plus the log of the mass outside them). Format 2 keeps, per token:

- adaptive coverage: the n smallest-rank entries whose probabilities first reach `top_p`
  (1 <= n <= K; top_p >= 1 keeps all K); the mass of the dropped entries joins the rest bucket,
  computed as logaddexp(rest_K, logsumexp(dropped)) so it stays exact;
- ids by `id_codec` (data/store_ids.py): packed, every id in id_bits(vocab) = ceil(log2(vocab))
  bits in rank order (18 for a 152k vocabulary); ef (Elias-Fano), the token's ids as a set in
  ascending id order, L = max(0, floor(log2(vocab / n))) low bits each plus the high parts in
  unary: at most n L + n + ((vocab - 1) >> L) bits per token whatever the ids (349 for n = 24
  at 151,646 against 432 packed). With ef the values (codes) are stored in that same ascending
  id order and the decoder restores the descending order of the log-probabilities, so both id
  codecs decode to the same (id, log-probability) pairs per token in rank order (entries of
  equal value may come in another order among themselves);
- log-probabilities by `logprob_codec`:
    float32 / float16: the values as given (lossless / float16 rounding);
    q<b> (2 <= b <= 12): the gaps d_i = l_1 - l_i to the token's top entry on a per-token grid
    of step Delta = (l_1 - l_n) / (2^b - 1) (rounded up to float16, stored per token), code
    round(d_i / Delta) in b bits (stored as increments from the previous entry's code: the
    codes never decrease, so the increments are small and compress), the top entry's code (0)
    not stored; with ef the codes themselves in id order, the top entry's code (0) included
    when b <= ceil(log2 K), else its index among the token's entries in ceil(log2 K) bits in
    place of its code (whichever is smaller). Decoding renormalises the
    entries to 1 - R with the rest mass R kept exact (float32), so every token sums to 1;
    per entry |log p_hat - log p| <= Delta and KL(p || p_hat) <= (1 - R) (e^Delta - 1)^2
    over the n + 1 outcomes (chi-square bound; docs/offline_teacher.md);
- the rest's log-mass as float32 and n as uint8 (uint16 / uint32 when K needs it); with ef
  and top_p >= 1 n is always K and not stored.

Payload of one sample of s tokens, E entries (in this order; `off` advances over each):
  packed: [n: s] [rest: s float32] ([step: s float16] [ids: E x id_bits] [increments:
          (E - s) x b bits] | [ids: E x id_bits] [values: E float16|float32])
  ef:     ([n: s]) [rest] ([step]) [low bits: sum n L] ([codes: E x b bits] | [codes of the
          non-top entries: (E - s) x b bits] [top index: s x ceil(log2 K) bits] | [values: E])
          [high bits in unary: to the end of the payload]
each bit stream padded to a byte.

One sample ([s] tokens) is one chunk: a 16-byte frame (magic, format version, encoding tag,
payload length) and the payload, zstd-compressed when `compression` is zstd (the `formats`
extra; zstd_module() is the one place that decides it). With tail_samples M > 0 the rest bucket
is replaced by M ids drawn outside the top K (data/store_tail.py: the section follows the rest
log-masses) and a token decodes to K + M slots with no rest. Decoded samples are padded to K with
id -1 and log-probability -inf, which losses/topk_kl.py reads as "no entry".

Coverage and quantiser math: data/store_values.py; id coding: data/store_ids.py (both re-exported
here); tail samples: data/store_tail.py. Imports numpy, zlib and those three only; must not import
torch, models, losses or training.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import numpy as np

from megatron_ddk.data.store_ids import (  # noqa: F401 (pack_bits, unpack_bits: re-exported)
    ID_CODECS,
    ef_decode,
    ef_encode,
    ef_low_bytes,
    ef_mean_bits_bound,
    ef_sample_bytes_bound,
    pack_bits,
    position_bits,
    unpack_bits,
)
from megatron_ddk.data.store_tail import (
    decode_tail,
    encode_tail,
    tail_bits_per_token,
    tail_section_bytes,
)
from megatron_ddk.data.store_values import (  # noqa: F401 (re-exported)
    adaptive_counts,
    delta_bound,
    dequantise,
    fold_rest,
    quant_step,
    quantise,
)

FRAME = struct.Struct("<4sBxxxII")
"""Chunk frame: magic, format version, 3 pad bytes, encoding tag (crc32), payload bytes."""
MAGIC = b"DDKT"
FORMAT_VERSION = 2
EXTRA = "formats"
"""The pip extra that brings the optional packages of this module (zstandard)."""


# The producer's defaults (megatron-ddk cache-teacher), chosen from the bench's table.

DEFAULT_TOP_K = 16
"""Default K (most entries per token), with DEFAULT_TAIL_SAMPLES draws for the rest.
bench/offline_teacher.py (docs/offline_teacher.md, "Benchmark"): without tail samples the KD
student trailed the online teacher's by +1.9% (format 1, K = 32) to +2.1% (K = 24, q4, ef): a
rest bucket coarsens this flat teacher. K = 16 with 8 tail samples: -0.14% from online, K = 8
with 16: -0.04% (one seed each). K = 16 + 8 keeps twice the exact head (for a sharper teacher,
whose mass sits there) at 60.4 bytes/token at most at 151,646 entries (K = 8 + 16: 56.2)."""

DEFAULT_TOP_P = 1.0
"""Default adaptive coverage: 1 keeps all K (tail samples need it). On the quickstart's flat
teacher top_p 0.95 kept 94% of the entries at K = 32 (no perplexity change)."""

DEFAULT_LOGPROB_CODEC = "q4"
"""Default log-probability encoding: the bench's KL error and perplexity did not move between
float16, q8, q6 and q4 at any K (truncation dominates); q4 is the smallest. The per-entry error
bound is the token's spread / 15 (docs/offline_teacher.md); use q8 for a sharper teacher whose
kept entries span many nats."""

DEFAULT_ID_CODEC = "ef"
"""Default id codec (bench, docs/offline_teacher.md "Benchmark"): at K = 24, q4, ef took at most
61.6 bytes/token at 151,646 entries whatever the ids (packed: 72.5) and decodes to the same
(id, log-probability) pairs as packed (bit-identical KD perplexity), at about half packed's
decode speed (still a few % of a step)."""

DEFAULT_TAIL_SAMPLES = 8
"""Default tail samples per token (0: the rest bucket alone): the M draws that make the KL's
gradient unbiased (losses/tail_sample.py); see DEFAULT_TOP_K for the measurement. With q4 and
ef at K = 16 they add at most 16.1 bytes/token at 151,646 entries (Elias-Fano, 129 bits)."""

DEFAULT_COMPRESSION = "none"
"""Default chunk compression: zstd saved 15-20% more here at half the read rate (opt-in)."""

DEFAULT_STORE_FORMAT = 2
"""Format the producer writes by default (1: fixed K, dense arrays, as before)."""


@dataclass(frozen=True)
class StoreEncoding:
    """How a format-2 store encodes each token (recorded in the header as `encoding`)."""

    vocab_size: int
    """Vocabulary of the ids: fixes the bits per id."""

    top_k: int = 32
    """Most entries kept per token (the producer's top-K)."""

    top_p: float = 1.0
    """Keep per token the fewest entries whose probabilities reach top_p (>= 1: all top_k)."""

    logprob_codec: str = "q8"
    """float32 | float16 (values as given) | q<b>: b-bit log-scale codes relative to the token's
    top entry, renormalised to the exact rest mass on decode (module docstring)."""

    compression: str = "none"
    """none | zstd: each sample's chunk compressed with zstd (needs the `formats` extra)."""

    zstd_level: int = 3
    """zstd level when compression is zstd."""

    id_codec: str = "packed"
    """packed (ceil(log2 vocab) bits per id, rank order) | ef (Elias-Fano over the token's id set,
    module docstring). An encoding recorded without it (stores written before ef) is packed."""

    tail_samples: int = 0
    """M > 0: the rest bucket is replaced by M ids drawn from the teacher's distribution outside
    the top-K (data/store_tail.py, losses/tail_sample.py), an unbiased sample of the tail; needs
    top_p 1. 0: the rest bucket alone (an encoding recorded without it has 0)."""

    @property
    def width(self) -> int:
        """Entries per decoded token: top_k, plus tail_samples with tail samples."""
        return self.top_k + max(0, self.tail_samples)

    @property
    def id_bits(self) -> int:
        """Bits per token id: ceil(log2(vocab_size)), at least 1."""
        return max(1, math.ceil(math.log2(max(2, self.vocab_size))))

    @property
    def code_bits(self) -> int:
        """Bits per quantised code (0 for the float codecs)."""
        return int(self.logprob_codec[1:]) if self.logprob_codec.startswith("q") else 0

    @property
    def count_dtype(self) -> np.dtype:
        """Per-token entry count: the smallest unsigned dtype that holds top_k."""
        return np.dtype(np.uint8 if self.top_k < 256 else np.uint16 if self.top_k < 65536
                        else np.uint32)

    @property
    def stores_counts(self) -> bool:
        """Whether the payload holds n per token (not with ef and top_p >= 1: n is always K)."""
        return not (self.id_codec == "ef" and self.top_p >= 1.0)

    @property
    def top_position(self) -> bool:
        """ef with q<b>: the top entry's index (ceil(log2 K) bits) is stored instead of its code
        (b bits), when that is smaller."""
        return self.id_codec == "ef" and self.code_bits > position_bits(self.top_k)

    @functools.cached_property
    def tag(self) -> int:
        """crc32 of the encoding's JSON: every chunk carries it (mixed encodings are named).
        id_codec packed is left out of the JSON, so the tags of stores written before id_codec
        existed are unchanged."""
        fields = asdict(self)
        if fields["id_codec"] == "packed":
            del fields["id_codec"]
        if not fields["tail_samples"]:  # likewise for stores written before tail samples
            del fields["tail_samples"]
        return zlib.crc32(json.dumps(fields, sort_keys=True).encode())

    def to_dict(self) -> dict:
        return dict(asdict(self), id_bits=self.id_bits, format_version=FORMAT_VERSION)

    @classmethod
    def from_dict(cls, data: dict) -> "StoreEncoding":
        keys = ("vocab_size", "top_k", "top_p", "logprob_codec", "compression", "zstd_level",
                "id_codec", "tail_samples")  # missing (older stores): packed, 0
        return cls(**{k: data[k] for k in keys if k in data})

    def errors(self) -> list:
        """What is wrong with these settings, one message per field (empty: valid)."""
        errs = []
        if not 1 <= self.top_k <= self.vocab_size:
            errs.append(f"top_k={self.top_k}: must be in [1, {self.vocab_size}] (the vocabulary)")
        if not 0.0 < self.top_p or math.isnan(self.top_p):
            errs.append(f"top_p={self.top_p}: must be in (0, 1] (1 keeps all top_k entries)")
        codec = self.logprob_codec
        if codec not in ("float32", "float16") and not (
                codec.startswith("q") and codec[1:].isdigit() and 2 <= int(codec[1:]) <= 12):
            errs.append(f"logprob_codec={codec!r}: use float32, float16 or q2 .. q12 (b-bit codes)")
        if self.compression not in ("none", "zstd"):
            errs.append(f"compression={self.compression!r}: use none or zstd")
        if self.id_codec not in ID_CODECS:
            errs.append(f"id_codec={self.id_codec!r}: use packed or ef")
        if not 0 <= self.tail_samples <= 65535:
            errs.append(f"tail_samples={self.tail_samples}: must be in [0, 65535] (0: none)")
        elif self.tail_samples and self.top_p < 1.0:
            errs.append(f"tail_samples={self.tail_samples}: needs top_p 1 (the draws cover "
                        f"the mass outside the top_k entries), got top_p={self.top_p}")
        return errs


def zstd_module():
    """The zstandard module; a ValueError naming the extra when it is not installed."""
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"compression zstd needs the zstandard package: pip install "
                         f"'megatron-ddk[{EXTRA}]' (or use compression none)") from None
    return zstandard


# ------------------------------------------------------------------------------ samples
def _kept(ids: np.ndarray, logp: np.ndarray, counts: np.ndarray):
    mask = np.arange(ids.shape[1])[None, :] < counts[:, None]
    token = np.repeat(np.arange(ids.shape[0]), counts)
    return ids[mask], logp[mask].astype(np.float64), token, mask


def _order_within(key: np.ndarray, counts: np.ndarray, top_k: int) -> np.ndarray:
    """[E] permutation sorting the entries of each token (contiguous, counts[t] each) by `key`
    ascending, ties in their given order; tokens stay in order."""
    s = counts.size
    mask = np.arange(top_k)[None, :] < counts[:, None]
    mat = np.empty((s, top_k), dtype=np.float64)
    mat[mask] = key
    mat[~mask] = np.inf  # after every entry (a stable sort keeps an entry's own inf before them)
    perm = np.argsort(mat, axis=1, kind="stable")
    return ((np.cumsum(counts) - counts)[:, None] + perm)[mask]


def encode_sample(ids: np.ndarray, logp: np.ndarray, rest: np.ndarray,
                  enc: StoreEncoding, tail_ids: Optional[np.ndarray] = None) -> bytes:
    """One sample's payload from its [s, K'] top entries (descending) and [s] log-mass outside
    them; entries past enc.top_k (K' > K) join the rest like the ones top_p drops. With
    enc.tail_samples M > 0, tail_ids [s, M] are the ids drawn outside the top K (K' = K)."""
    ids, logp = np.asarray(ids), np.asarray(logp, np.float64)
    want = ((ids.shape[0], enc.tail_samples), enc.top_k) if enc.tail_samples else (None, None)
    got = (None if tail_ids is None else np.shape(tail_ids),
           ids.shape[1] if enc.tail_samples else None)
    if want != got:
        raise ValueError(f"encoding with tail_samples={enc.tail_samples}: (tail ids, entries "
                         f"per token) must be {want}, got {got}")
    counts = np.minimum(adaptive_counts(logp, enc.top_p), enc.top_k)
    if not enc.stores_counts and ids.shape[1] < enc.top_k:
        raise ValueError(f"{ids.shape[1]} entries per token given, but id codec ef with top_p "
                         f">= 1 stores no counts: every token needs top_k={enc.top_k}")
    rest = fold_rest(logp, np.asarray(rest, np.float64), counts).astype(np.float32)
    ids, logp = ids[:, :enc.top_k], logp[:, :enc.top_k]
    flat_ids, flat_lp, token, _ = _kept(ids, logp, counts)
    starts = np.cumsum(counts) - counts
    parts = [counts.astype(enc.count_dtype).tobytes()] if enc.stores_counts else []
    parts.append(rest.tobytes())
    if enc.tail_samples:
        parts.append(encode_tail(np.asarray(tail_ids), rest, enc.vocab_size, enc.id_codec,
                                 enc.id_bits))
    codes = None
    if enc.code_bits:
        last = flat_lp[np.cumsum(counts) - 1]
        step = quant_step(logp[:, 0] - last, enc.code_bits)
        not_top = np.ones(flat_lp.size, dtype=bool)
        not_top[starts] = False
        gaps = logp[:, 0][token] - flat_lp
        codes = np.zeros(flat_lp.size, dtype=np.int64)
        codes[not_top] = quantise(gaps[not_top], step[token][not_top], enc.code_bits)
        parts.append(step.tobytes())
    if enc.id_codec == "packed":
        parts.append(pack_bits(flat_ids, enc.id_bits))
        if codes is not None:
            # codes are non-decreasing within a token: store the increments (small, compressible)
            parts.append(pack_bits(np.diff(codes, prepend=0)[not_top], enc.code_bits))
        else:
            parts.append(flat_lp.astype(np.dtype(enc.logprob_codec)).tobytes())
        return b"".join(parts)
    order = _order_within(flat_ids, counts, enc.top_k)  # ascending ids within each token
    low, high = ef_encode(flat_ids[order], counts, enc.vocab_size)
    parts.append(low)
    if codes is None:
        parts.append(flat_lp[order].astype(np.dtype(enc.logprob_codec)).tobytes())
    elif enc.top_position:
        where = np.empty(order.size, dtype=np.int64)
        where[order] = np.arange(order.size)  # rank-order entry -> its place in id order
        top = where[starts]
        keep = np.ones(order.size, dtype=bool)
        keep[top] = False
        parts += [pack_bits(codes[order][keep], enc.code_bits),
                  pack_bits(top - starts, position_bits(enc.top_k))]
    else:
        parts.append(pack_bits(codes[order], enc.code_bits))
    parts.append(high)
    return b"".join(parts)


def sample_counts(payload: bytes, num_tokens: int, enc: StoreEncoding) -> np.ndarray:
    """[s] entries per token of one sample's payload."""
    if not enc.stores_counts:
        return np.full(num_tokens, enc.top_k, dtype=np.int64)
    return np.frombuffer(payload, enc.count_dtype, num_tokens, 0).astype(np.int64)


def decode_sample(payload: bytes, num_tokens: int, enc: StoreEncoding
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [s, K] int64 padded with -1, log-probabilities [s, K] float32 padded with -inf,
    rest [s] float32) of one sample's payload; entries in descending log-probability order."""
    s, k = num_tokens, enc.top_k
    counts = sample_counts(payload, s, enc)
    off = s * enc.count_dtype.itemsize if enc.stores_counts else 0
    rest = np.frombuffer(payload, np.float32, s, off)
    off += 4 * s
    tail = None
    if enc.tail_samples:
        n_tail = tail_section_bytes(s, enc.tail_samples, enc.vocab_size, enc.id_codec,
                                    enc.id_bits)
        tail = decode_tail(payload[off:off + n_tail], rest, enc.tail_samples, enc.vocab_size,
                           enc.id_codec, enc.id_bits)
        off += n_tail
    total = int(counts.sum())
    token = np.repeat(np.arange(s), counts)
    starts = np.cumsum(counts) - counts
    step = None
    if enc.code_bits:
        step = np.frombuffer(payload, np.float16, s, off)
        off += 2 * s
    if enc.id_codec == "packed":
        n_id = -(-total * enc.id_bits // 8)
        flat_ids = unpack_bits(payload[off:off + n_id], total, enc.id_bits)
        off += n_id
        if step is not None:
            increments = np.zeros(total, dtype=np.int64)
            not_top = np.ones(total, dtype=bool)
            not_top[starts] = False
            increments[not_top] = unpack_bits(payload[off:], total - s, enc.code_bits)
            run = np.cumsum(increments)
            codes = run - (run[starts] - increments[starts])[token]  # cumsum within each token
            flat_lp = dequantise(codes, step, token, rest, s)
        else:
            flat_lp = np.frombuffer(payload, np.dtype(enc.logprob_codec), total, off)
    else:
        n_low = ef_low_bytes(counts, enc.vocab_size)
        low = payload[off:off + n_low]
        off += n_low
        if step is None:
            values = np.frombuffer(payload, np.dtype(enc.logprob_codec), total, off)
            off += total * values.itemsize
            key = -values.astype(np.float64)
        else:
            codes, off = _ef_codes(payload, off, counts, starts, enc)
            key = codes
        flat_ids = ef_decode(low, payload[off:], counts, enc.vocab_size)
        order = _order_within(key, counts, k)  # back to rank order: descending log-probability
        flat_ids = flat_ids[order]
        flat_lp = values[order] if step is None else dequantise(codes[order], step, token,
                                                                 rest, s)
    mask = np.arange(k)[None, :] < counts[:, None]
    ids = np.full((s, k), -1, dtype=np.int64)
    logp = np.full((s, k), -np.inf, dtype=np.float32)
    ids[mask], logp[mask] = flat_ids, flat_lp
    if tail is None:
        return ids, logp, np.array(rest, dtype=np.float32)
    return (np.concatenate([ids, tail[0]], axis=1), np.concatenate([logp, tail[1]], axis=1),
            np.full(s, -np.inf, dtype=np.float32))  # the draws carry the rest's mass


def _ef_codes(payload: bytes, off: int, counts: np.ndarray, starts: np.ndarray,
              enc: StoreEncoding) -> Tuple[np.ndarray, int]:
    """The [E] codes of an ef payload in id order (the top entry's 0 restored), next offset."""
    s, total, b = counts.size, int(counts.sum()), enc.code_bits
    if not enc.top_position:
        n = -(-total * b // 8)
        return unpack_bits(payload[off:off + n], total, b), off + n
    n_codes, pbits = -(-(total - s) * b // 8), position_bits(enc.top_k)
    stored = unpack_bits(payload[off:off + n_codes], total - s, b)
    off += n_codes
    n_pos = -(-s * pbits // 8)
    top = unpack_bits(payload[off:off + n_pos], s, pbits)
    if s and (top >= counts).any():
        raise ValueError("top entry index past the token's entries (corrupt payload)")
    keep = np.ones(total, dtype=bool)
    keep[starts + top] = False
    codes = np.zeros(total, dtype=np.int64)
    codes[keep] = stored
    return codes, off + n_pos


def payload_bytes(counts: np.ndarray, enc: StoreEncoding) -> int:
    """Uncompressed payload bytes of one sample with these per-token entry counts: exact for
    packed; for ef the most it can take, whatever the ids (store_ids.ef_bits_bound)."""
    s, total = counts.size, int(np.sum(counts))
    fixed = s * ((enc.count_dtype.itemsize if enc.stores_counts else 0) + 4
                 + (2 if enc.code_bits else 0))
    if not enc.code_bits:
        values = total * np.dtype(enc.logprob_codec).itemsize
    elif enc.id_codec == "packed" or enc.top_position:
        values = -(-(total - s) * enc.code_bits // 8)
        if enc.top_position:
            values += -(-s * position_bits(enc.top_k) // 8)
    else:
        values = -(-total * enc.code_bits // 8)
    ids = (-(-total * enc.id_bits // 8) if enc.id_codec == "packed"
           else ef_sample_bytes_bound(counts, enc.vocab_size))
    tail = tail_section_bytes(s, enc.tail_samples, enc.vocab_size, enc.id_codec, enc.id_bits)
    return fixed + ids + values + tail


def bytes_per_token(entries_per_token: float, vocab_size: int, logprob_codec: str = "q8",
                    top_k: int = 32, top_p: float = 1.0, id_codec: str = "packed",
                    tail_samples: int = 0) -> float:
    """Uncompressed format-2 bytes per token for a mean number of entries per token (the
    arithmetic plan_teacher_store and the bench use to project to another vocabulary). packed:
    exact (byte padding aside); ef: the most, whatever the ids and however the entries are
    spread over tokens (store_ids.ef_mean_bits_bound; exact worst case when top_p >= 1)."""
    enc = StoreEncoding(vocab_size=vocab_size, top_k=top_k, top_p=top_p,
                        logprob_codec=logprob_codec, id_codec=id_codec, tail_samples=tail_samples)
    n, b = float(entries_per_token), enc.code_bits
    fixed = (enc.count_dtype.itemsize if enc.stores_counts else 0) + 4 + (2 if b else 0)
    if not b:
        values = n * np.dtype(enc.logprob_codec).itemsize
    elif id_codec == "packed" or enc.top_position:
        values = ((n - 1) * b + (position_bits(top_k) if enc.top_position else 0)) / 8
    else:
        values = n * b / 8
    ids = (n * enc.id_bits if id_codec == "packed"
           else ef_mean_bits_bound(n, top_k, vocab_size)) / 8
    tail = tail_bits_per_token(tail_samples, vocab_size, id_codec, enc.id_bits) / 8
    return fixed + ids + values + tail


# ------------------------------------------------------------------------------ chunks
def frame_chunk(payload: bytes, enc: StoreEncoding, compressor=None) -> bytes:
    """The stored chunk: frame + payload (zstd-compressed with `compressor` when given)."""
    body = compressor.compress(payload) if compressor is not None else payload
    return FRAME.pack(MAGIC, FORMAT_VERSION, enc.tag, len(body)) + body


def unframe_chunk(chunk, enc: StoreEncoding, decompressor=None, where: str = "chunk") -> bytes:
    """The payload of a stored chunk; ValueError naming `where` for another format / encoding or
    a truncated chunk."""
    chunk = bytes(chunk)
    if len(chunk) < FRAME.size:
        raise ValueError(f"{where}: {len(chunk)} bytes, shorter than a chunk frame (corrupt)")
    magic, version, tag, size = FRAME.unpack_from(chunk)
    if magic != MAGIC:
        raise ValueError(f"{where}: not a teacher-store chunk (magic {magic!r}; corrupt)")
    if version != FORMAT_VERSION or tag != enc.tag:
        raise ValueError(f"{where}: written by format {version} encoding tag {tag:#010x}, but "
                         f"the header says format {FORMAT_VERSION} encoding tag {enc.tag:#010x} "
                         f"(a shard of another producer run mixed in); rebuild this shard")
    body = chunk[FRAME.size:]
    if len(body) != size:
        raise ValueError(f"{where}: payload {len(body)} bytes, frame says {size} (corrupt)")
    return decompressor.decompress(body) if decompressor is not None else body


def codec_objects(enc: StoreEncoding) -> Tuple[Optional[object], Optional[object]]:
    """(compressor, decompressor) of the encoding's compression (None, None without)."""
    if enc.compression != "zstd":
        return None, None
    zstd = zstd_module()
    return zstd.ZstdCompressor(level=enc.zstd_level), zstd.ZstdDecompressor()
