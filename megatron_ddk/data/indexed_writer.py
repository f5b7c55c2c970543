"""A streaming writer of Megatron-Core indexed datasets (.bin/.idx) in bounded memory.

Writes the same bytes as megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder
(add_document per document, then finalize), which tests check byte for byte, but keeps nothing
per document in memory: sequence lengths and document boundaries are appended to two spill files
beside the output and streamed into the .idx at the end, sequence pointers computed chunk by
chunk. Memory is O(chunk), whatever the number of documents.

The .idx layout (Megatron-Core's _IndexWriter): b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code,
<Q sequence count, <Q document count (boundaries, leading 0 included), int32 sequence lengths,
int64 sequence byte offsets, int64 document boundaries (sequence indices).

Everything goes to <tmp_prefix>.bin/.idx; commit_dataset renames into place, with the record of
the tokenizer the dataset was built with (<prefix>.tokenizer.json; dataset_tokenizer reads it).
check_dataset reads a dataset's header and sizes back (manifest loading, dataset building): a
truncated .bin or a corrupt .idx is named there instead of failing deep inside Megatron-Core.
Imports numpy only (no torch, no megatron.core).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Optional

import numpy as np

from megatron_ddk.atomic import remove_stale_tmp, write_atomic

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
"""Megatron-Core DType codes of the two token dtypes it picks (optimal_dtype)."""
_CHUNK = 1 << 20  # sequences per chunk when streaming the index


def token_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Megatron-Core's DType.optimal_dtype: uint16 for a vocabulary below 65500, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


class IndexedWriter:
    """append(tokens, lengths, doc_ends) per batch, then finalize() or abort()."""

    def __init__(self, tmp_prefix: str, dtype: np.dtype) -> None:
        self.prefix, self.dtype = tmp_prefix, np.dtype(dtype)
        self.num_sequences, self.num_documents, self.num_tokens = 0, 0, 0
        self._bin = open(tmp_prefix + ".bin", "wb")
        self._lengths = open(tmp_prefix + ".lengths", "w+b")
        self._docs = open(tmp_prefix + ".docs", "w+b")

    def append(self, tokens: np.ndarray, lengths: np.ndarray, docs_per_seqs: np.ndarray) -> None:
        """tokens: the batch's tokens (self.dtype) in order; lengths: int32 tokens per sequence;
        docs_per_seqs: sequences per document (0 for an empty document)."""
        self._bin.write(tokens.tobytes())
        self._lengths.write(np.asarray(lengths, dtype=np.int32).tobytes())
        ends = self.num_sequences + np.cumsum(docs_per_seqs, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.num_sequences += len(lengths)
        self.num_documents += len(docs_per_seqs)
        self.num_tokens += int(tokens.size)

    def _stream(self, f, dtype, count: int, out, transform=None) -> None:
        f.seek(0)
        item = np.dtype(dtype).itemsize
        for start in range(0, count, _CHUNK):
            chunk = np.frombuffer(f.read(min(_CHUNK, count - start) * item), dtype=dtype)
            out.write((transform(chunk) if transform else chunk).tobytes())

    def finalize(self) -> None:
        """Close the .bin and write the .idx (streamed from the spill files)."""
        self._bin.close()
        item = self.dtype.itemsize
        offset = [0]

        def pointers(lengths: np.ndarray) -> np.ndarray:
            ptr = np.empty(lengths.size, dtype=np.int64)
            if lengths.size:
                ptr[0] = offset[0]
                np.cumsum(lengths[:-1].astype(np.int64) * item, out=ptr[1:])
                ptr[1:] += offset[0]
                offset[0] = int(ptr[-1]) + int(lengths[-1]) * item
            return ptr

        with open(self.prefix + ".idx", "wb") as out:
            out.write(INDEX_HEADER + struct.pack("<Q", 1)
                      + struct.pack("<B", DTYPE_CODES[self.dtype]))
            out.write(struct.pack("<Q", self.num_sequences))
            out.write(struct.pack("<Q", self.num_documents + 1))
            self._stream(self._lengths, np.int32, self.num_sequences, out)
            self._stream(self._lengths, np.int32, self.num_sequences, out, pointers)
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            self._stream(self._docs, np.int64, self.num_documents, out)
        self._close_spills()

    def _close_spills(self) -> None:
        for f in (self._lengths, self._docs):
            f.close()
            try:
                os.remove(f.name)
            except FileNotFoundError:
                pass

    def abort(self) -> None:
        """Close and remove everything written (the temporary .bin/.idx and spill files)."""
        self._bin.close()
        self._close_spills()
        for suffix in (".bin", ".idx"):
            try:
                os.remove(self.prefix + suffix)
            except FileNotFoundError:
                pass


_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
"""Bytes per token of each Megatron-Core DType code (uint8, int8, int16, int32, int64, float64,
float32, uint16)."""
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8


def check_dataset(prefix: str) -> tuple:
    """(documents, tokens) of the dataset at prefix, after checking what Megatron-Core would
    otherwise trip over later: the .idx header (magic, version, dtype code), the .idx size its
    counts imply, and the .bin size the sequence lengths x the token size imply. ValueError
    naming the file and the cause (truncated or corrupt: rebuild it)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            raise ValueError(f"file {path} does not exist")
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or header[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise ValueError(f"{idx} is not a Megatron-Core index (its first bytes are "
                         f"{header[:len(INDEX_HEADER)]!r}, expected {INDEX_HEADER!r}): the file "
                         "is corrupt or not an .idx; rebuild the dataset")
    pos = len(INDEX_HEADER)
    version, = struct.unpack("<Q", header[pos:pos + 8])
    code = header[pos + 8]
    num_seqs, num_docs = struct.unpack("<QQ", header[pos + 9:pos + 25])
    if version != 1 or code not in _ITEMSIZE:
        raise ValueError(f"{idx}: index version {version} / dtype code {code} (expected version 1"
                         f" and a code in {sorted(_ITEMSIZE)}): the file is corrupt; rebuild it")
    expected = _HEADER_BYTES + num_seqs * (4 + 8) + num_docs * 8
    if idx_size != expected:
        raise ValueError(f"{idx} holds {idx_size} bytes but its header ({num_seqs} sequences, "
                         f"{num_docs} document boundaries) implies {expected}: the file is "
                         "truncated or corrupt; rebuild the dataset")
    lengths = np.fromfile(idx, dtype=np.int32, count=num_seqs, offset=_HEADER_BYTES)
    tokens = int(lengths.sum(dtype=np.int64))
    bin_size, bin_expected = os.path.getsize(bin_), tokens * _ITEMSIZE[code]
    if bin_size != bin_expected:
        raise ValueError(f"{bin_} holds {bin_size} bytes but {idx} describes {tokens} tokens "
                         f"of {_ITEMSIZE[code]} bytes ({bin_expected} bytes): the .bin is "
                         f"{'truncated' if bin_size < bin_expected else 'longer than its index'}"
                         "; rebuild the dataset")
    return max(int(num_docs) - 1, 0), tokens


TOKENIZER_RECORD = ".tokenizer.json"
"""Beside <prefix>.bin/.idx: {"tokenizer_hash": "sha256:..." or null, "vocab_size": N}."""

DATASET_FILES = (".bin", ".idx", TOKENIZER_RECORD)
"""The files of a dataset at <prefix> (the record may be absent: datasets built before it)."""


def remove_quietly(*paths: str) -> None:
    """Remove files that may not exist."""
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def commit_dataset(tmp_prefix: str, prefix: str, tokenizer: Optional[dict] = None) -> None:
    """Rename a finished temporary dataset into place: any old .idx goes first, then the record
    of its tokenizer (when known) is written, then the new .bin, then the new .idx, so a crash in
    between never leaves a complete-looking pair, nor a pair with another dataset's record.
    Temporary files of `prefix` left by a killed writer are removed too."""
    remove_stale_tmp(prefix)
    remove_quietly(prefix + ".idx", prefix + TOKENIZER_RECORD)
    if tokenizer is not None:
        write_atomic(prefix + TOKENIZER_RECORD, json.dumps(tokenizer, sort_keys=True))
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")


def dataset_tokenizer(prefix: str) -> Optional[dict]:
    """The tokenizer record of a dataset, or None for one built before datasets recorded it."""
    path = prefix + TOKENIZER_RECORD
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({err}); rebuild the dataset") from None
    if not isinstance(rec, dict) or "vocab_size" not in rec:
        raise ValueError(f"{path} is not a tokenizer record; rebuild the dataset")
    return rec
