"""One domain's corpus -> train / valid / test Megatron datasets (the per-domain hold-out).

tokenize_domain tokenizes a domain's files into one temporary dataset in which every input
document (a "source") is one Megatron document and each of its pieces one sequence: documents
longer than max_piece_bytes are cut at paragraph / line boundaries first (pieces.py), the
eod follows a source's last piece. split_domain then lets heldout.plan_split draw the valid and
test pieces (every source's first piece before any second one) and writes

- valid / test: one document per held-out piece, an eod after each (pieces that ended inside
  their source get one), so samples never run from one piece into another unmarked;
- train: the pieces left, in corpus order, with the consecutive pieces of one source joined
  back into one document (one sequence: GPTDataset shuffles sequences, so pieces kept apart
  would be scattered); where a held-out piece was taken out of a source, the text before it
  ends with an eod and the text after it starts a new document.

So a source without held-out pieces trains exactly as its pieces' tokens in order, and a source
that is never cut is copied as it was. Pieces are tokenized one by one, so a token that would
have merged across a cut is two tokens (cuts fall after a line end, where few merges cross).

Imports megatron.core lazily (to read and write datasets); from megatron_ddk: atomic,
data.manifest, data.dataset_files and data.preprocessing (heldout, build, writer, engine).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_ddk.atomic import remove_stale_tmp
from megatron_ddk.data.dataset_files import DATASET_FILES, dataset_tokenizer
from megatron_ddk.data.manifest import DomainEntry
from megatron_ddk.data.preprocessing.build import tokenize_to_datasets
from megatron_ddk.data.preprocessing.heldout import (
    HeldOutSpec,
    advice,
    domain_seed,
    plan_split,
    set_summary,
    shortfall,
)
from megatron_ddk.data.preprocessing.writer import commit_dataset, remove_quietly

logger = logging.getLogger(__name__)


def write_groups(src_prefix: str, groups: Sequence[np.ndarray], prefix: str,
                 eod: Optional[int] = None,
                 needs_eod: Optional[np.ndarray] = None) -> Tuple[int, int]:
    """Write one document per group of sequences of a dataset (the group's sequences joined, in
    order), atomically; an eod is appended to a group whose last sequence has needs_eod set.
    Returns (num_documents, num_tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    src = IndexedDataset(src_prefix, mmap=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=src.index.dtype)
    tail = np.array([] if eod is None else [eod], dtype=src.index.dtype)
    num_tokens = 0
    try:
        for group in groups:
            parts = [src[int(i)] for i in group]
            if eod is not None and needs_eod is not None and needs_eod[int(group[-1])]:
                parts.append(tail)
            ids = np.concatenate(parts) if len(parts) > 1 else parts[0]
            builder.add_document(ids, [ids.size])
            num_tokens += ids.size
        builder.finalize(tmp + ".idx")
        commit_dataset(tmp, prefix, dataset_tokenizer(src_prefix))
    except BaseException:
        builder.data_file.close()
        remove_quietly(tmp + ".bin", tmp + ".idx")
        raise
    return len(groups), int(num_tokens)


@dataclass
class TokenizedDomain:
    """A domain tokenized to one temporary dataset, waiting to be split (tokenize_domain)."""

    name: str
    """Domain name."""

    folder: str
    """<out_dir>/<name>: where its train/valid/test datasets go."""

    all_prefix: str
    """The temporary dataset holding every piece (removed by split_domain / discard)."""

    lengths: np.ndarray
    """Tokens per piece (the eod of a source's last piece included), corpus order."""

    sources: np.ndarray
    """Source document (0-based, corpus order) of every piece."""

    eod: Optional[int] = None
    """The eod token id that ends every source (read back from the dataset)."""

    def discard(self) -> None:
        """Remove the temporary dataset."""
        remove_quietly(*(self.all_prefix + s for s in DATASET_FILES))

    @property
    def num_sources(self) -> int:
        """Input documents with tokens."""
        return int(self.sources[-1]) + 1 if self.sources.size else 0

    def ends_source(self) -> np.ndarray:
        """Whether each piece is the last of its source (and so ends with the eod)."""
        return np.r_[self.sources[1:] != self.sources[:-1], True] if self.sources.size \
            else np.zeros(0, dtype=bool)


def tokenize_domain(name: str, paths: Sequence[str], out_dir: str, tokenizer_model: str,
                    workers: int = 1, skip_malformed: bool = False, progress: bool = False,
                    max_piece_bytes: int = 0) -> TokenizedDomain:
    """Tokenize one domain into <out_dir>/<name>/.all_text_document.tmp<pid> (first phase of
    build_domain), documents longer than max_piece_bytes cut into pieces; ValueError for a
    domain with no non-empty document."""
    folder = os.path.join(os.path.abspath(out_dir), name)
    all_prefix = os.path.join(folder, f".all_text_document.tmp{os.getpid()}")
    remove_stale_tmp(os.path.join(folder, ".all_text_document"))  # a killed build's leftovers
    from megatron_ddk.data.preprocessing.engine import EmptyInputError

    try:
        tokenize_to_datasets(paths, {"text": all_prefix}, tokenizer_model, workers=workers,
                             skip_malformed=skip_malformed, progress=progress,
                             max_piece_bytes=max_piece_bytes)
    except EmptyInputError as err:
        raise ValueError(f"domain {name} is empty: {', '.join(paths)} hold no document with "
                         f"text ({err.detail}); remove the domain or fix its files") from None
    empty = np.zeros(0, dtype=np.int64)
    tokenized = TokenizedDomain(name, folder, all_prefix, empty, empty)
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        # Keep `full` alive while reading: its index is a view of an mmap closed in __del__.
        full = IndexedDataset(all_prefix, mmap=True)
        tokenized.lengths = np.array(full.sequence_lengths, dtype=np.int64)
        starts = np.asarray(full.document_indices, dtype=np.int64)
        tokenized.sources = np.repeat(np.arange(starts.size - 1), np.diff(starts))
        if tokenized.lengths.size:
            tokenized.eod = int(full[int(tokenized.lengths.size - 1)][-1])
        del full
    except BaseException:
        tokenized.discard()
        raise
    return tokenized


def train_groups(train_mask: np.ndarray, sources: np.ndarray) -> List[np.ndarray]:
    """The training pieces (mask) as runs of consecutive pieces of one source, corpus order."""
    ids = np.flatnonzero(train_mask)
    if not ids.size:
        return []
    breaks = np.flatnonzero((np.diff(ids) != 1) | (sources[ids[1:]] != sources[ids[:-1]])) + 1
    return np.split(ids, breaks)


def _write_split(tokenized: TokenizedDomain, valid_ids, test_ids, spec: HeldOutSpec) -> dict:
    prefix = {s: os.path.join(tokenized.folder, f"{s}_text_document")
              for s in ("train", "valid", "test")}
    needs_eod = ~tokenized.ends_source()
    train_mask = np.ones(tokenized.lengths.size, dtype=bool)
    train_mask[valid_ids] = False
    train_mask[test_ids] = False
    write = (lambda groups, split: write_groups(tokenized.all_prefix, groups, prefix[split],
                                                tokenized.eod, needs_eod))
    out = {"train_prefixes": [prefix["train"]], "valid_prefix": prefix["valid"]}
    out["num_train_documents"], out["num_train_tokens"] = write(
        train_groups(train_mask, tokenized.sources), "train")
    out["num_train_sources"] = int(np.unique(tokenized.sources[train_mask]).size)
    out["num_valid_documents"], out["num_valid_tokens"] = write(
        [np.array([i]) for i in valid_ids], "valid")
    out["num_valid_sources"] = set_summary(valid_ids, tokenized.lengths, tokenized.sources)[1]
    if spec.test_samples:
        out["test_prefix"] = prefix["test"]
        out["num_test_documents"], out["num_test_tokens"] = write(
            [np.array([i]) for i in test_ids], "test")
        out["num_test_sources"] = set_summary(test_ids, tokenized.lengths, tokenized.sources)[1]
    else:
        remove_quietly(*(prefix["test"] + s for s in DATASET_FILES))  # a stale one
    return out


def split_domain(tokenized: TokenizedDomain, spec: HeldOutSpec, seed: int) -> DomainEntry:
    """Write the train / valid (/ test) datasets of a tokenized domain (second phase of
    build_domain) and remove its temporary dataset. ValueError (with the numbers and what to
    change) when the domain cannot hold the held-out sets."""
    name = tokenized.name
    try:
        split = plan_split(tokenized.lengths, spec, domain_seed(seed, name), tokenized.sources)
        if split is None:
            raise ValueError(shortfall(name, tokenized.lengths, spec, domain_seed(seed, name),
                                       tokenized.sources) + "; " + advice(spec))
        fields = _write_split(tokenized, *split, spec)
    finally:
        tokenized.discard()
    entry = DomainEntry(name=name, **fields)
    logger.info("domain %s: %s", name, entry.describe_sets())
    return entry


def build_domain(
    name: str,
    paths: Sequence[str],
    out_dir: str,
    tokenizer_model: str,
    valid_samples: int = 500,
    valid_seq_length: int = 4096,
    seed: int = 1234,
    workers: int = 1,
    skip_malformed: bool = False,
    progress: bool = False,
    test_samples: Optional[int] = None,
    test_seq_length: Optional[int] = None,
    max_piece_bytes: int = 0,
    min_documents: int = 1,
) -> DomainEntry:
    """Tokenize one domain and split it into <out_dir>/<name>/train_text_document,
    valid_text_document and test_text_document (heldout.py: pieces drawn seeded by seed and
    the domain name). test_samples / test_seq_length default to the valid ones;
    test_samples=0 writes no test set."""
    spec = HeldOutSpec(valid_samples, valid_seq_length,
                       valid_samples if test_samples is None else test_samples,
                       valid_seq_length if test_seq_length is None else test_seq_length,
                       test_follows_valid=test_samples is None, min_documents=min_documents)
    tokenized = tokenize_domain(name, paths, out_dir, tokenizer_model, workers=workers,
                                skip_malformed=skip_malformed, progress=progress,
                                max_piece_bytes=max_piece_bytes)
    return split_domain(tokenized, spec, seed)
