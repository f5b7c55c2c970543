"""A streaming writer of Megatron-Core indexed datasets (.bin/.idx) in bounded memory.

Writes the same bytes as megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder
(add_document per document, then finalize), which tests check byte for byte, but keeps nothing
per document in memory: sequence lengths and document boundaries are appended to two spill files
beside the output and streamed into the .idx at the end, sequence pointers computed chunk by
chunk. Memory is O(chunk), whatever the number of documents. The .idx layout and its
constants: megatron_ddk/data/dataset_files.py.

Everything goes to <tmp_prefix>.bin/.idx; commit_dataset renames into place, with the record of
the tokenizer the dataset was built with (<prefix>.tokenizer.json). Reading a dataset back
(check_dataset, dataset_tokenizer: manifest loading and dataset building at train time) is
megatron_ddk/data/dataset_files.py's. Imports numpy, megatron_ddk.atomic and data.dataset_files
(no torch, no megatron.core).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Optional

import numpy as np

from megatron_ddk.atomic import remove_stale_tmp, write_atomic
from megatron_ddk.data.dataset_files import DTYPE_CODES, INDEX_HEADER, TOKENIZER_RECORD

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
