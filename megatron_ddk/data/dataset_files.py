"""The files of a built dataset, read back: the .bin/.idx check and the tokenizer record.

A dataset at <prefix> is Megatron-Core's <prefix>.bin / <prefix>.idx (written by
data/preprocessing/writer.py) and <prefix>.tokenizer.json, the record of the tokenizer it was built
with. What training reads before Megatron-Core does lives here: check_dataset reads a dataset's
header and sizes back (manifest loading, dataset building), so that a truncated .bin or a corrupt
.idx is named instead of failing deep inside Megatron-Core; dataset_tokenizer reads the record.

The .idx layout (Megatron-Core's _IndexWriter): b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code,
<Q sequence count, <Q document count (boundaries, leading 0 included), int32 sequence lengths,
int64 sequence byte offsets, int64 document boundaries (sequence indices).
Imports numpy only (no torch, no megatron.core, nothing from megatron_ddk).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Optional

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
"""Megatron-Core DType codes of the two token dtypes it picks (optimal_dtype)."""

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
