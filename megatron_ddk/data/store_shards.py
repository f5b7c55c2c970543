"""One shard of the offline teacher store on disk, both formats: write it atomically, read rows.

    format 1 (fixed K, dense arrays; still read, and written with --store-format 1):
        sample_ids.npy [m] int64, checksums.npy [m] uint32, topk_ids.npy [m, s, K] uint16|int32,
        topk_logprobs.npy [m, s, K] float16|float32, rest_logprob.npy [m, s] float32
    format 2 (data/store_codec.py: adaptive entries, Elias-Fano or bit-packed ids, quantised
    log-probs):
        sample_ids.npy [m] int64, checksums.npy [m] uint32,
        index.npy  [m + 1] int64   byte offset of sample row i's chunk in chunks.bin
        chunk_crc.npy [m] uint32   crc32 of each stored chunk (frame + payload)
        entries.npy [m] int64      entries kept per sample (the header's measured statistics)
        chunks.bin                 the chunks, one per sample (zstd-compressed when enabled)

Every file is memory-mapped by the reader, so a row is one slice of chunks.bin: random access
per (domain, sample) whatever the compression. A shard is written into <shard>.tmp/ (each file
fsync'ed) and renamed into place, so a crash never leaves a half shard that looks complete. A
chunk whose crc32, frame or encoding does not match is a ValueError naming its file and row.

Imports numpy and data.store_codec only.
"""

from __future__ import annotations

import os
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from megatron_ddk.atomic import atomic_folder
from megatron_ddk.data.store_codec import (
    StoreEncoding,
    codec_objects,
    decode_sample,
    encode_sample,
    frame_chunk,
    sample_counts,
    unframe_chunk,
)

V1_ARRAYS = ("sample_ids", "checksums", "topk_ids", "topk_logprobs", "rest_logprob")
V2_ARRAYS = ("sample_ids", "checksums", "index", "chunk_crc", "entries")
CHUNKS = "chunks.bin"


def _save(folder: str, name: str, arr: np.ndarray) -> None:
    with open(os.path.join(folder, name + ".npy"), "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic_dir(final: str, fill) -> None:
    """`fill(tmp)` builds the shard in a temporary sibling folder, renamed into place whole
    (atomic.atomic_folder: a dead writer's folder is removed by the next write)."""
    with atomic_folder(final) as tmp:
        fill(tmp)


def write_v1(final: str, arrays: Dict[str, np.ndarray], dtypes: Dict[str, str]) -> None:
    """A format-1 shard (dense [m, s, K] arrays), renamed into place."""
    def fill(tmp):
        for key in V1_ARRAYS:
            _save(tmp, key, np.ascontiguousarray(arrays[key], dtype=dtypes[key]))
    _write_atomic_dir(final, fill)


def write_v2(final: str, arrays: Dict[str, np.ndarray], enc: StoreEncoding) -> None:
    """A format-2 shard: one encoded chunk per sample from the [m, s, K] top-K arrays."""
    compressor, _ = codec_objects(enc)
    m = len(arrays["sample_ids"])
    index, crc, entries = np.zeros(m + 1, np.int64), np.zeros(m, np.uint32), np.zeros(m, np.int64)

    def fill(tmp):
        with open(os.path.join(tmp, CHUNKS), "wb") as f:
            for i in range(m):
                tail = arrays["tail_ids"][i] if enc.tail_samples else None
                payload = encode_sample(arrays["topk_ids"][i], arrays["topk_logprobs"][i],
                                        arrays["rest_logprob"][i], enc, tail)
                chunk = frame_chunk(payload, enc, compressor)
                f.write(chunk)
                index[i + 1] = index[i] + len(chunk)
                crc[i] = zlib.crc32(chunk)
                entries[i] = _entries(payload, len(arrays["rest_logprob"][i]), enc)
            f.flush()
            os.fsync(f.fileno())
        _save(tmp, "sample_ids", np.asarray(arrays["sample_ids"], np.int64))
        _save(tmp, "checksums", np.asarray(arrays["checksums"], np.uint32))
        _save(tmp, "index", index)
        _save(tmp, "chunk_crc", crc)
        _save(tmp, "entries", entries)
    _write_atomic_dir(final, fill)


def _entries(payload: bytes, num_tokens: int, enc: StoreEncoding) -> int:
    return int(sample_counts(payload, num_tokens, enc).sum())


class ShardV1:
    """Rows of a format-1 shard (memory-mapped)."""

    def __init__(self, folder: str):
        self.arrays = {k: np.load(os.path.join(folder, k + ".npy"), mmap_mode="r")
                       for k in V1_ARRAYS}
        self.sample_ids, self.checksums = self.arrays["sample_ids"], self.arrays["checksums"]

    def row(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.arrays
        return a["topk_ids"][i], a["topk_logprobs"][i], a["rest_logprob"][i]


class ShardV2:
    """Rows of a format-2 shard: the index and chunks.bin memory-mapped, one chunk per row."""

    def __init__(self, folder: str, enc: StoreEncoding, seq_length: int):
        self.folder, self.enc, self.seq_length = folder, enc, seq_length
        self.arrays = {k: np.load(os.path.join(folder, k + ".npy"), mmap_mode="r")
                       for k in V2_ARRAYS}
        self.sample_ids, self.checksums = self.arrays["sample_ids"], self.arrays["checksums"]
        size = os.path.getsize(os.path.join(folder, CHUNKS))
        if int(self.arrays["index"][-1]) != size:
            raise ValueError(f"{folder}/{CHUNKS}: {size} bytes but index.npy ends at "
                             f"{int(self.arrays['index'][-1])} (truncated or corrupt shard); "
                             f"delete this shard folder and rerun the producer to rewrite it")
        self.data = np.memmap(os.path.join(folder, CHUNKS), dtype=np.uint8, mode="r") \
            if size else np.zeros(0, np.uint8)
        self._decompressor: Optional[object] = codec_objects(enc)[1]

    def row(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = int(self.arrays["index"][i]), int(self.arrays["index"][i + 1])
        chunk = self.data[lo:hi].tobytes()
        where = f"{self.folder}/{CHUNKS} row {i} (sample {int(self.sample_ids[i])})"
        if zlib.crc32(chunk) != int(self.arrays["chunk_crc"][i]):
            raise ValueError(f"{where}: crc32 mismatch (corrupt chunk); delete this shard folder "
                             f"and rerun the producer to rewrite it")
        payload = unframe_chunk(chunk, self.enc, self._decompressor, where)
        return decode_sample(payload, self.seq_length, self.enc)


def open_shard(folder: str, header: dict):
    """The shard reader of the header's format."""
    if int(header["format_version"]) == 1:
        return ShardV1(folder)
    enc = StoreEncoding.from_dict(header["encoding"])
    return ShardV2(folder, enc, int(header["identity"]["seq_length"]))


def shard_bytes(folder: str) -> int:
    """Bytes of a shard on disk (all its files)."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
