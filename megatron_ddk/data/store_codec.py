"""The offline teacher store's compact encoding (format 2): pure numpy, no I/O.

Per token the producer hands over the teacher's top-K (ids and log-probabilities in descending
order, plus the log of the mass outside them). Format 2 keeps, per token:

- adaptive coverage: the n smallest-rank entries whose probabilities first reach `top_p`
  (1 <= n <= K; top_p >= 1 keeps all K); the mass of the dropped entries joins the rest bucket,
  computed as logaddexp(rest_K, logsumexp(dropped)) so it stays exact;
- ids bit-packed in id_bits(vocab) = ceil(log2(vocab)) bits (18 for a 152k vocabulary);
- log-probabilities by `logprob_codec`:
    float32 / float16: the values as given (lossless / float16 rounding);
    q<b> (2 <= b <= 12): the gaps d_i = l_1 - l_i to the token's top entry on a per-token grid
    of step Delta = (l_1 - l_n) / (2^b - 1) (rounded up to float16, stored per token), code
    round(d_i / Delta) in b bits (stored as increments from the previous entry's code: the
    codes never decrease, so the increments are small and compress), the top entry's code (0)
    not stored. Decoding renormalises the
    entries to 1 - R with the rest mass R kept exact (float32), so every token sums to 1;
    per entry |log p_hat - log p| <= Delta and KL(p || p_hat) <= (1 - R) (e^Delta - 1)^2
    over the n + 1 outcomes (chi-square bound; docs/offline_teacher.md);
- the rest's log-mass as float32 and n as uint8 (uint16 / uint32 when K needs it).

One sample ([s] tokens) is one chunk: a 16-byte frame (magic, format version, encoding tag,
payload length) and the payload, zstd-compressed when `compression` is zstd (the `formats`
extra; zstd_module() is the one place that decides it). Decoded samples are padded to K with
id -1 and log-probability -inf, which losses/topk_kl.py reads as "no entry".

Imports numpy and zlib only; must not import torch, models, losses or training.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import numpy as np

FRAME = struct.Struct("<4sBxxxII")
"""Chunk frame: magic, format version, 3 pad bytes, encoding tag (crc32), payload bytes."""
MAGIC = b"DDKT"
FORMAT_VERSION = 2
EXTRA = "formats"
"""The pip extra that brings the optional packages of this module (zstandard)."""


# The producer's defaults (megatron-ddk cache-teacher), chosen from the bench's table.

DEFAULT_TOP_K = 24
"""Default K (most entries per token). bench/offline_teacher.py (docs/offline_teacher.md,
"Benchmark"): the KD student's test perplexity against format 1's float16 K = 32 store was
+0.007% at K = 32 (q8, top_p 0.95), +0.207% at K = 24, +0.331% at K = 20, +0.49% at K = 16;
K = 24 is the smallest K measured within 0.3%."""

DEFAULT_TOP_P = 1.0
"""Default adaptive coverage: 1 keeps all K. On the quickstart's flat teacher top_p 0.95 kept
94% of the entries at K = 32 (no perplexity change); only K = 24 with top_p 1 was trained."""

DEFAULT_LOGPROB_CODEC = "q4"
"""Default log-probability encoding: the bench's KL error and perplexity did not move between
float16, q8, q6 and q4 at any K (truncation dominates); q4 is the smallest. The per-entry error
bound is the token's spread / 15 (docs/offline_teacher.md); use q8 for a sharper teacher whose
kept entries span many nats."""

DEFAULT_COMPRESSION = "none"
"""Default chunk compression: zstd saved 15-20% more on the demo's 12-bit ids, at about half the
read throughput; it needs the `formats` extra, so it is opt-in."""

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
    def tag(self) -> int:
        """crc32 of the encoding's JSON: every chunk carries it (mixed encodings are named)."""
        return zlib.crc32(json.dumps(asdict(self), sort_keys=True).encode())

    def to_dict(self) -> dict:
        return dict(asdict(self), id_bits=self.id_bits, format_version=FORMAT_VERSION)

    @classmethod
    def from_dict(cls, data: dict) -> "StoreEncoding":
        keys = ("vocab_size", "top_k", "top_p", "logprob_codec", "compression", "zstd_level")
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
        return errs


def zstd_module():
    """The zstandard module; a ValueError naming the extra when it is not installed."""
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"compression zstd needs the zstandard package: pip install "
                         f"'megatron-ddk[{EXTRA}]' (or use compression none)") from None
    return zstandard


# ------------------------------------------------------------------------------ bits
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
    bitmat = np.unpackbits(raw[:need], count=count * bits, bitorder="little").reshape(count, bits)
    return bitmat.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


# ------------------------------------------------------------------------------ coverage
def adaptive_counts(logp: np.ndarray, top_p: float) -> np.ndarray:
    """[n] entries kept per token of [n, K] descending log-probabilities: the fewest whose
    probabilities reach top_p (at least 1; all K when top_p >= 1)."""
    n, k = logp.shape
    if top_p >= 1.0:
        return np.full(n, k, dtype=np.int64)
    cum = np.cumsum(np.exp(logp.astype(np.float64)), axis=1)
    reached = cum >= top_p
    first = np.where(reached.any(axis=1), reached.argmax(axis=1), k - 1)
    return first.astype(np.int64) + 1


def fold_rest(logp: np.ndarray, rest: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[n] log of the mass outside the kept entries: the stored rest plus the dropped entries."""
    k = logp.shape[1]
    dropped = np.arange(k)[None, :] >= counts[:, None]
    vals = np.where(dropped, logp.astype(np.float64), -np.inf)
    both = np.concatenate([vals, rest.astype(np.float64)[:, None]], axis=1)
    m = both.max(axis=1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = safe + np.log(np.exp(both - safe[:, None]).sum(axis=1))
    return np.where(np.isfinite(m), out, -np.inf)


# ------------------------------------------------------------------------------ quantiser
def quant_step(spread: np.ndarray, bits: int) -> np.ndarray:
    """Per-token grid step: spread / (2^bits - 1), rounded up to the next float16."""
    step = spread.astype(np.float64) / float((1 << bits) - 1)
    s16 = step.astype(np.float16)
    low = s16.astype(np.float64) < step
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


def quantise(gaps: np.ndarray, step16: np.ndarray, bits: int) -> np.ndarray:
    """Codes round(gap / step) in [0, 2^bits - 1] ([E] gaps, [E] float16 steps)."""
    step = step16.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step > 0, np.rint(gaps / np.where(step > 0, step, 1.0)), 0.0)
    return np.clip(codes, 0, (1 << bits) - 1).astype(np.int64)


def dequantise(codes: np.ndarray, step16: np.ndarray, token: np.ndarray, rest: np.ndarray,
               num_tokens: int) -> np.ndarray:
    """[E] log-probabilities from codes (entry e of token token[e]): exp(-code * step),
    renormalised per token to the exact mass 1 - exp(rest)."""
    gaps = codes.astype(np.float64) * step16.astype(np.float64)[token]
    w = np.exp(-gaps)  # the top entry has gap 0: every token's sum is >= 1
    total = np.bincount(token, weights=w, minlength=num_tokens)
    with np.errstate(divide="ignore"):
        kept = np.log(-np.expm1(rest.astype(np.float64)))  # log(1 - R); R = 0 gives 0
    return kept[token] - gaps - np.log(total)[token]


def delta_bound(logp: np.ndarray, counts: np.ndarray, bits: int) -> np.ndarray:
    """[n] the per-entry log-probability error bound Delta of q<bits> (module docstring)."""
    last = np.take_along_axis(logp.astype(np.float64), (counts - 1)[:, None], axis=1)[:, 0]
    return quant_step(logp[:, 0].astype(np.float64) - last, bits).astype(np.float64)


# ------------------------------------------------------------------------------ samples
def _kept(ids: np.ndarray, logp: np.ndarray, counts: np.ndarray):
    mask = np.arange(ids.shape[1])[None, :] < counts[:, None]
    token = np.repeat(np.arange(ids.shape[0]), counts)
    return ids[mask], logp[mask].astype(np.float64), token, mask


def encode_sample(ids: np.ndarray, logp: np.ndarray, rest: np.ndarray,
                  enc: StoreEncoding) -> bytes:
    """One sample's payload from its [s, K'] top entries (descending) and [s] log-mass outside
    them; entries past enc.top_k (K' > K) join the rest like the ones top_p drops."""
    ids, logp = np.asarray(ids), np.asarray(logp, np.float64)
    counts = np.minimum(adaptive_counts(logp, enc.top_p), enc.top_k)
    rest = fold_rest(logp, np.asarray(rest, np.float64), counts).astype(np.float32)
    ids, logp = ids[:, :enc.top_k], logp[:, :enc.top_k]
    flat_ids, flat_lp, token, _ = _kept(ids, logp, counts)
    parts = [counts.astype(enc.count_dtype).tobytes(), rest.tobytes()]
    if enc.code_bits:
        last = flat_lp[np.cumsum(counts) - 1]
        step = quant_step(logp[:, 0] - last, enc.code_bits)
        not_top = np.ones(flat_lp.size, dtype=bool)
        not_top[np.cumsum(counts) - counts] = False
        gaps = logp[:, 0][token] - flat_lp
        codes = np.zeros(flat_lp.size, dtype=np.int64)
        codes[not_top] = quantise(gaps[not_top], step[token][not_top], enc.code_bits)
        # codes are non-decreasing within a token: store the increments (small, compressible)
        increments = np.diff(codes, prepend=0)[not_top]
        parts += [step.tobytes(), pack_bits(flat_ids, enc.id_bits),
                  pack_bits(increments, enc.code_bits)]
    else:
        parts += [pack_bits(flat_ids, enc.id_bits),
                  flat_lp.astype(np.dtype(enc.logprob_codec)).tobytes()]
    return b"".join(parts)


def decode_sample(payload: bytes, num_tokens: int, enc: StoreEncoding
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [s, K] int64 padded with -1, log-probabilities [s, K] float32 padded with -inf,
    rest [s] float32) of one sample's payload."""
    s, k, off = num_tokens, enc.top_k, 0
    counts = np.frombuffer(payload, enc.count_dtype, s, off).astype(np.int64)
    off += s * enc.count_dtype.itemsize
    rest = np.frombuffer(payload, np.float32, s, off)
    off += 4 * s
    total = int(counts.sum())
    token = np.repeat(np.arange(s), counts)
    if enc.code_bits:
        step = np.frombuffer(payload, np.float16, s, off)
        off += 2 * s
        n_id = -(-total * enc.id_bits // 8)
        flat_ids = unpack_bits(payload[off:off + n_id], total, enc.id_bits)
        off += n_id
        increments = np.zeros(total, dtype=np.int64)
        starts = np.cumsum(counts) - counts
        not_top = np.ones(total, dtype=bool)
        not_top[starts] = False
        increments[not_top] = unpack_bits(payload[off:], total - s, enc.code_bits)
        run = np.cumsum(increments)
        codes = run - (run[starts] - increments[starts])[token]  # cumsum within each token
        flat_lp = dequantise(codes, step, token, rest, s)
    else:
        n_id = -(-total * enc.id_bits // 8)
        flat_ids = unpack_bits(payload[off:off + n_id], total, enc.id_bits)
        flat_lp = np.frombuffer(payload, np.dtype(enc.logprob_codec), total, off + n_id)
    mask = np.arange(k)[None, :] < counts[:, None]
    ids = np.full((s, k), -1, dtype=np.int64)
    logp = np.full((s, k), -np.inf, dtype=np.float32)
    ids[mask], logp[mask] = flat_ids, flat_lp
    return ids, logp, np.array(rest, dtype=np.float32)


def payload_bytes(counts: np.ndarray, enc: StoreEncoding) -> int:
    """Uncompressed payload bytes of one sample with these per-token entry counts."""
    s, total = counts.size, int(np.sum(counts))
    fixed = s * (enc.count_dtype.itemsize + 4 + (2 if enc.code_bits else 0))
    values = (-(-(total - s) * enc.code_bits // 8) if enc.code_bits
              else total * np.dtype(enc.logprob_codec).itemsize)
    return fixed + -(-total * enc.id_bits // 8) + values


def bytes_per_token(entries_per_token: float, vocab_size: int, logprob_codec: str = "q8",
                    top_k: int = 32) -> float:
    """Uncompressed format-2 bytes per token for a mean number of entries per token (the
    arithmetic plan_teacher_store and the bench use to project to another vocabulary)."""
    enc = StoreEncoding(vocab_size=vocab_size, top_k=top_k, logprob_codec=logprob_codec)
    n = float(entries_per_token)
    fixed = enc.count_dtype.itemsize + 4 + (2 if enc.code_bits else 0)
    values = (n - 1) * enc.code_bits / 8 if enc.code_bits else \
        n * np.dtype(enc.logprob_codec).itemsize
    return fixed + n * enc.id_bits / 8 + values


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
