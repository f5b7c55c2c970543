"""Preprocessing: raw documents -> Megatron-Core indexed datasets (.bin/.idx), and the per-domain
train/validation hold-out.

- tokenize_to_datasets: JSONL/.txt files -> one dataset per json key, tokenized by worker
  processes through the Megatron-Core tokenizer (tokenizer.build_tokenizer) and written with
  megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder. Results are consumed in input
  order, so the bytes written do not depend on the worker count. Everything is written under a
  temporary name and renamed at the end (.bin first, .idx last, an older .idx removed first), so
  a failed or interrupted run leaves nothing that looks complete.
- select_validation_documents / build_domain: the DDK hold-out. Whole documents, drawn in a
  seeded random order, go to validation until they hold valid_samples x (valid_seq_length + 1)
  tokens; the rest is the training set, disjoint by construction.

Imports megatron.core lazily (the fork of the worker pool inherits it); imports corpus, tokenizer
and manifest from megatron_ddk.data, nothing from other layers.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ddk.atomic import remove_stale_tmp
from megatron_ddk.data.corpus import (
    MalformedLineError, ReadCounts, check_input_files, input_format, iter_raw_lines, parse_line,
)
from megatron_ddk.data.manifest import DomainEntry
from megatron_ddk.data.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

_BATCH_LINES = 256
_BATCH_BYTES = 1 << 17
_WORKER: dict = {}  # per-process tokenizer state, set by _init_worker


@dataclass
class PreprocessResult:
    """What tokenize_to_datasets wrote."""

    prefixes: Dict[str, str]
    """Output prefix (no .bin/.idx) per json key."""

    num_documents: Dict[str, int] = field(default_factory=dict)
    """Documents written per json key."""

    num_tokens: Dict[str, int] = field(default_factory=dict)
    """Tokens written per json key, EOD tokens included."""

    num_empty_skipped: int = 0
    """Empty documents (text "") skipped, summed over keys."""

    num_malformed_skipped: int = 0
    """Malformed lines skipped (only with skip_malformed)."""

    seconds: float = 0.0
    """Wall time of the run (after the one-off imports and tokenizer load)."""


def _init_worker(model_path: str, json_keys: Sequence[str], append_eod: bool,
                 eos_token: Optional[str] = None) -> None:
    tok = build_tokenizer(model_path, eos_token)
    _WORKER.update(tok=tok, eod=tok.eod, json_keys=tuple(json_keys), append_eod=append_eod)


def _encode_batch(batch: Tuple[str, int, List[bytes]]):
    """Tokenize one batch of raw lines of one file: [(line_no, kind, payload)], kind 'ok' with a
    tuple of int arrays (None for an empty document), 'blank', or 'bad' with the reason."""
    path, first_line, raws = batch
    fmt = input_format(path)
    tok, eod, keys = _WORKER["tok"], _WORKER["eod"], _WORKER["json_keys"]
    out = []
    for offset, raw in enumerate(raws):
        try:
            docs = parse_line(raw, fmt, keys)
        except MalformedLineError as err:
            out.append((first_line + offset, "bad", str(err)))
            continue
        if docs is None:
            out.append((first_line + offset, "blank", None))
            continue
        arrays = []
        for text in docs:
            if not text:
                arrays.append(None)
                continue
            ids = tok.tokenize(text)
            if _WORKER["append_eod"]:
                ids.append(eod)
            arrays.append(np.asarray(ids, dtype=np.int32))
        out.append((first_line + offset, "ok", tuple(arrays)))
    return path, out


def _batches(paths: Sequence[str]) -> Iterator[Tuple[str, int, List[bytes]]]:
    """Raw lines grouped per file into batches of <= _BATCH_LINES lines / ~_BATCH_BYTES."""
    current, first, size, cur_path = [], 1, 0, None
    for path, line_no, raw in iter_raw_lines(paths):
        if current and (path != cur_path or len(current) >= _BATCH_LINES or size >= _BATCH_BYTES):
            yield cur_path, first, current
            current, size = [], 0
        if not current:
            first, cur_path = line_no, path
        current.append(raw)
        size += len(raw)
    if current:
        yield cur_path, first, current


class _Bounded:
    """Feeds a Pool at most `limit` batches ahead of the consumer (bounded memory)."""

    def __init__(self, items, limit: int) -> None:
        self.items, self.slots, self.stopped = items, threading.Semaphore(limit), False

    def __iter__(self):
        for item in self.items:
            while not self.slots.acquire(timeout=0.1):
                if self.stopped:
                    return
            if self.stopped:
                return
            yield item

    def done_one(self) -> None:
        self.slots.release()


def _encoded(paths, model_path, json_keys, append_eod, workers, eos_token=None) -> Iterator:
    """(path, [(line_no, kind, payload)]) per batch, in input order."""
    init_args = (model_path, json_keys, append_eod, eos_token)
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(_encode_batch, _batches(paths))
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    feed = _Bounded(_batches(paths), limit=4 * workers)
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
    try:
        for item in pool.imap(_encode_batch, feed, chunksize=1):
            feed.done_one()
            yield item
        pool.close()
    finally:
        feed.stopped = True
        pool.terminate()
        pool.join()


def _remove_quietly(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def commit_dataset(tmp_prefix: str, prefix: str) -> None:
    """Rename a finished temporary dataset into place: any old .idx goes first, then the new
    .bin, then the new .idx, so a crash in between never leaves a complete-looking pair.
    Temporary files of `prefix` left by a killed writer are removed too."""
    remove_stale_tmp(prefix)
    _remove_quietly(prefix + ".idx")
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")


class _Progress:
    """tqdm bar in documents/s with tokens/s in the postfix (no-op when disabled).

    The bar is created at the first update, i.e. after the worker pool has forked: tqdm's
    monitor thread must not exist when the process forks."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc, self.bar = enabled, desc, None
        self.tokens, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, num_docs: int, num_tokens: int) -> None:
        self.tokens += num_tokens
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.desc, unit="doc", dynamic_ncols=True)
        self.bar.update(num_docs)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"{self.tokens / (now - self.start):,.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} tok/s")
            self.bar.close()


def _write_batch(path, lines, keys, builders, result, counts, skip_malformed, bar) -> None:
    """Append one encoded batch to the builders, in line order."""
    num_docs = num_tokens = 0
    for line_no, kind, payload in lines:
        if kind == "bad":
            where = f"{path}:{line_no}: {payload}"
            if not skip_malformed:
                raise MalformedLineError(
                    f"{where}; fix the line or pass --skip-malformed to skip such lines")
            counts.num_malformed_skipped += 1
            counts.first_malformed = counts.first_malformed or where
            continue
        if kind == "blank":
            continue
        for key, ids in zip(keys, payload):
            if ids is None:
                result.num_empty_skipped += 1
                continue
            builders[key].add_document(ids, [ids.size])
            result.num_documents[key] += 1
            result.num_tokens[key] += int(ids.size)
            num_tokens += int(ids.size)
        num_docs += 1
    bar.update(num_docs, num_tokens)


def tokenize_to_datasets(
    paths: Sequence[str],
    prefixes: Dict[str, str],
    tokenizer_model: str,
    workers: int = 1,
    append_eod: bool = True,
    skip_malformed: bool = False,
    progress: bool = False,
    eos_token: Optional[str] = None,
) -> PreprocessResult:
    """Tokenize the documents of `paths` (in order) into one dataset per json key.

    prefixes maps each json key to its output prefix. Empty documents are skipped and counted;
    a malformed line raises ValueError naming file:line unless skip_malformed. eos_token is for
    a Hugging Face tokenizer that names no end-of-document token.
    """
    check_input_files(paths)  # before the slow import, so a typo fails fast
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    keys = list(prefixes)
    dtype = DType.optimal_dtype(build_tokenizer(tokenizer_model, eos_token).vocab_size)
    start = time.perf_counter()  # after the one-off imports of megatron.core and transformers
    result = PreprocessResult(prefixes=dict(prefixes), num_documents=dict.fromkeys(keys, 0),
                              num_tokens=dict.fromkeys(keys, 0))
    counts = ReadCounts()
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in prefixes.items()}
    for prefix in prefixes.values():
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builders = {k: IndexedDatasetBuilder(tmp[k] + ".bin", dtype=dtype) for k in keys}
    bar = _Progress(progress, desc=os.path.basename(prefixes[keys[0]]))
    stream = contextlib.closing(
        _encoded(paths, tokenizer_model, keys, append_eod, workers, eos_token))
    try:
        with stream as batches:
            for path, lines in batches:
                _write_batch(path, lines, keys, builders, result, counts, skip_malformed, bar)
        for key in keys:
            builders[key].finalize(tmp[key] + ".idx")
        for key in keys:
            commit_dataset(tmp[key], prefixes[key])
    except BaseException:
        for key in keys:
            builders[key].data_file.close()
            _remove_quietly(tmp[key] + ".bin", tmp[key] + ".idx")
        raise
    finally:
        bar.close()
    result.num_malformed_skipped = counts.num_malformed_skipped
    if counts.num_malformed_skipped:
        logger.warning("skipped %d malformed lines (first: %s)", counts.num_malformed_skipped,
                       counts.first_malformed)
    result.seconds = time.perf_counter() - start
    return result


def select_validation_documents(lengths: np.ndarray, target_tokens: int, seed: int,
                                where: str = "domain") -> np.ndarray:
    """Sorted ids of whole documents, taken in a seeded random order until their lengths sum to
    >= target_tokens. ValueError when that needs every document (nothing left to train on)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if lengths.size == 0 or total == 0:
        raise ValueError(f"{where} is empty (no documents with tokens)")
    order = np.random.default_rng(seed).permutation(lengths.size)
    cumulative = np.cumsum(lengths[order])
    num_valid = int(np.searchsorted(cumulative, target_tokens)) + 1
    if num_valid >= lengths.size:
        raise ValueError(
            f"{where}: validation needs {target_tokens} tokens (valid_samples x (valid_seq_length"
            f" + 1)) but the domain has only {total} tokens in {lengths.size} documents, so "
            "nothing would be left for training; lower --valid-samples / --valid-seq-length "
            "or add data"
        )
    return np.sort(order[:num_valid])


def write_subset(src_prefix: str, doc_ids: np.ndarray, prefix: str) -> Tuple[int, int]:
    """Copy the given documents (in the order given) of a dataset into a new one, atomically.
    Returns (num_documents, num_tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    src = IndexedDataset(src_prefix, mmap=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=src.index.dtype)
    num_tokens = 0
    try:
        for i in doc_ids:
            ids = src[int(i)]
            builder.add_document(ids, [ids.size])
            num_tokens += ids.size
        builder.finalize(tmp + ".idx")
        commit_dataset(tmp, prefix)
    except BaseException:
        builder.data_file.close()
        _remove_quietly(tmp + ".bin", tmp + ".idx")
        raise
    return len(doc_ids), num_tokens


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
) -> DomainEntry:
    """Tokenize one domain and split it into <out_dir>/<name>/train_text_document and
    valid_text_document. The validation set holds whole documents with at least
    valid_samples x (valid_seq_length + 1) tokens; the seed is mixed with the domain name, so
    adding a domain does not change the others' split."""
    if valid_samples < 1 or valid_seq_length < 1:
        raise ValueError(f"domain {name}: valid_samples ({valid_samples}) and valid_seq_length "
                         f"({valid_seq_length}) must be >= 1")
    folder = os.path.join(os.path.abspath(out_dir), name)
    all_prefix = os.path.join(folder, f".all_text_document.tmp{os.getpid()}")
    remove_stale_tmp(os.path.join(folder, ".all_text_document"))  # a killed build's leftovers
    train, valid = (os.path.join(folder, f"{s}_text_document") for s in ("train", "valid"))
    res = tokenize_to_datasets(paths, {"text": all_prefix}, tokenizer_model, workers=workers,
                               skip_malformed=skip_malformed, progress=progress)
    try:
        if res.num_documents["text"] == 0:
            raise ValueError(f"domain {name} is empty: {list(paths)} hold no non-empty "
                             "documents; remove the domain or fix its files")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        # Keep `full` alive while reading: its index is a view of an mmap closed in __del__.
        full = IndexedDataset(all_prefix, mmap=True)
        lengths = np.array(full.sequence_lengths, dtype=np.int64)
        del full
        domain_seed = (seed + zlib.crc32(name.encode("utf-8"))) % (2**32)
        target = valid_samples * (valid_seq_length + 1)
        valid_ids = select_validation_documents(lengths, target, domain_seed, f"domain {name}")
        train_mask = np.ones(lengths.size, dtype=bool)
        train_mask[valid_ids] = False
        num_train_docs, num_train_tokens = write_subset(
            all_prefix, np.flatnonzero(train_mask), train)
        num_valid_docs, num_valid_tokens = write_subset(all_prefix, valid_ids, valid)
    finally:
        _remove_quietly(all_prefix + ".bin", all_prefix + ".idx")
    logger.info("domain %s: train %d docs / %d tokens, valid %d docs / %d tokens", name,
                num_train_docs, num_train_tokens, num_valid_docs, num_valid_tokens)
    return DomainEntry(
        name=name, train_prefixes=[train], valid_prefix=valid,
        num_train_tokens=num_train_tokens, num_train_documents=num_train_docs,
        num_valid_tokens=num_valid_tokens, num_valid_documents=num_valid_docs,
    )
