"""The preprocessing engine: JSONL/.txt lines -> token ids -> Megatron-Core .bin/.idx, streaming.

Pipeline: the main process reads raw lines in batches of about BATCH_BYTES (whole lines), in
output order; `workers` processes (or the main process itself when workers == 1) parse the JSON,
encode the batch with one tokenizer call (SentencePiece / Rust tokenizers batch APIs) and pack the
ids into one array per json key; the main process appends the arrays to the .bin and the lengths
to the streaming index writer (writer.py) strictly in batch order. So the bytes do not
depend on the worker count, and they equal Megatron-LM's preprocess_data.py for the same
tokenizer and flags:
- a document is one sequence, or one per sentence (--split-sentences, or a JSON list of strings),
  or one per piece (max_piece_bytes: long documents cut at paragraph / line boundaries);
  sequences of zero tokens are dropped; eod goes after the last sequence (append_eod);
- keep_empty=True (Megatron-LM): a document without tokens is written as an empty document (no
  eod); keep_empty=False (megatron_ddk's own pipeline): it is skipped and counted;
- partitions > 1 (Megatron-LM --partitions) without keep_sequential_samples orders documents as
  Megatron-LM's round-robin partition files merged in partition order: lines 0, P, 2P, ... then
  1, P+1, ...; with keep_sequential_samples (or partitions == 1) the input order is kept.
Blank JSONL lines are ignored (Megatron-LM stops on them); a malformed line stops the run naming
file:line, or is skipped and counted (skip_malformed).

Memory bound: the reader runs at most 2 x workers + 2 batches ahead of the writer (raw text in,
packed ids out: ~1-2 x BATCH_BYTES each); a worker encoding a batch holds its texts and the
Python id lists (~12 x BATCH_BYTES); the index writer streams 1M-sequence chunks (12 MiB). So
about workers x 12 x BATCH_BYTES + (2 x workers + 2) x 2 x BATCH_BYTES + 12 MiB (~25 MiB for two
workers) plus the tokenizer, independent of the input size; one document larger than a batch is
held whole.

Workers run in a concurrent.futures.ProcessPoolExecutor, which notices the death of any worker
(killed for memory, SIGKILL, os._exit): the run then stops with WorkerDiedError naming the input
lines in flight and the exit signal, instead of waiting forever for the lost batch (as
multiprocessing.Pool.imap does).

Inputs without any document with tokens are an EmptyInputError naming the files, unless
allow_empty (then an empty, valid dataset is written).

Output is written under temporary names and renamed into place at the end (commit); on any error
or interrupt the temporary files are removed and older outputs are left as they were; temporary
files a killed earlier run left beside the outputs are removed first.

Imports numpy and, lazily, the tokenizer library in use; no torch or megatron.core on the
SentencePiece / GPT-2 path. From megatron_ddk: atomic, data.megatron_tokenizers and
data.preprocessing's corpus, writer, pieces and sentences.
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from megatron_ddk.atomic import remove_stale_tmp
from megatron_ddk.console import CommandFailed
from megatron_ddk.data.megatron_tokenizers import TokenizerSpec, build_encoder
from megatron_ddk.data.preprocessing.corpus import (
    MalformedLineError,
    check_input_files,
    input_format,
    parse_record,
)
from megatron_ddk.data.preprocessing.pieces import document_splitter
from megatron_ddk.data.preprocessing.writer import IndexedWriter, commit_dataset, token_dtype
from megatron_ddk.data.tokenizer import tokenizer_hash
from megatron_ddk.lifeline import watch_parent

BATCH_BYTES = 1 << 19
"""Text per batch (whole lines; a longer line is a batch of its own)."""
BATCH_LINES = 4096
_STATE: dict = {}  # per-process: encoder, splitter and job options (set before forking)


@dataclass
class EncodeJob:
    """One preprocessing run."""

    paths: List[str]
    """Input files (.jsonl/.json/.txt, optionally .gz), read in this order."""

    prefixes: Dict[str, str]
    """Output prefix (no .bin/.idx) per json key; the order is the key order."""

    tokenizer: TokenizerSpec
    """Which tokenizer (megatron_tokenizers.TokenizerSpec)."""

    append_eod: bool = True
    """Append the tokenizer's eod after each non-empty document."""

    workers: int = 1
    """Encoding processes (1: in the main process). Output does not depend on it."""

    keep_empty: bool = False
    """Write documents without tokens as empty documents (Megatron-LM) instead of skipping."""

    split_sentences: bool = False
    """One sequence per nltk punkt sentence (Megatron-LM --split-sentences)."""

    keep_newlines: bool = False
    """With split_sentences: keep the newlines after sentences (--keep-newlines)."""

    lang: str = "english"
    """punkt language for split_sentences (--lang)."""

    max_piece_bytes: int = 0
    """Cut every document longer than this many UTF-8 bytes into pieces at paragraph / line
    boundaries (pieces.py), one sequence per piece, the eod after the last; 0: never cut
    (Megatron-LM's behaviour). Excludes split_sentences."""

    partitions: int = 1
    """Megatron-LM --partitions: the document order of its partition-and-merge (see above)."""

    keep_sequential_samples: bool = False
    """With partitions > 1: keep the input order (Megatron-LM --keep-sequential-samples)."""

    skip_malformed: bool = False
    """Skip and count malformed lines instead of stopping."""

    allow_empty: bool = False
    """Write an empty dataset when the inputs hold no document with tokens (else
    EmptyInputError, and nothing is written)."""


@dataclass
class EncodeStats:
    """What a run wrote (per json key where keyed)."""

    num_documents: Dict[str, int] = field(default_factory=dict)
    """Documents written per key (empty ones included when keep_empty)."""

    num_tokens: Dict[str, int] = field(default_factory=dict)
    """Tokens written per key, eod included."""

    num_empty: int = 0
    """Documents without tokens (skipped, or written empty when keep_empty), all keys."""

    num_malformed_skipped: int = 0
    """Malformed lines skipped (skip_malformed)."""

    first_malformed: str = ""
    """'file:line: reason' of the first skipped malformed line."""

    num_parsed: int = 0
    """Input lines parsed as documents (blank JSONL lines and skipped malformed ones not)."""

    num_bytes: int = 0
    """Input bytes read."""

    seconds: float = 0.0
    """Wall time from the first batch read to the commit."""


def _open(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def line_format(path: str) -> str:
    """'jsonl' or 'txt' (a .gz suffix is looked through); ValueError otherwise."""
    return input_format(path[:-3] if path.lower().endswith(".gz") else path)


def _batches(paths: Sequence[str], partitions: int, sequential: bool) -> Iterator[tuple]:
    """(path, first_line, step, [raw lines]) in output order (see the module docstring)."""
    passes = 1 if partitions <= 1 or sequential else partitions
    for part in range(passes):
        index = 0  # line index over all files: Megatron-LM's round-robin counter
        for path in paths:
            raws: List[bytes] = []
            size, first = 0, None
            with _open(path) as f:
                for line_no, raw in enumerate(f, start=1):
                    keep = index % passes == part
                    index += 1
                    if not keep:
                        continue
                    if first is None:
                        first = line_no
                    raws.append(raw)
                    size += len(raw)
                    if size >= BATCH_BYTES or len(raws) >= BATCH_LINES:
                        yield path, first, passes, raws
                        raws, size, first = [], 0, None
            if raws:
                yield path, first, passes, raws


def _init_state(job: EncodeJob, threads: int = 1) -> None:
    encoder = build_encoder(job.tokenizer, num_threads=threads)
    _STATE.update(
        encoder=encoder, keys=tuple(job.prefixes), append_eod=job.append_eod,
        keep_empty=job.keep_empty, dtype=token_dtype(encoder.vocab_size),
        splitter=document_splitter(job.max_piece_bytes, job.split_sentences, job.lang,
                                   job.keep_newlines))


def _worker_init(job: EncodeJob) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the pool, the workers
    # must not die with a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent()  # a SIGKILLed main process must not leave its workers encoding
    if "encoder" not in _STATE:  # spawn start method: nothing inherited
        _init_state(job)


def _parse(raw: bytes, fmt: str, keys, splitter) -> Optional[List[List[str]]]:
    """Sentences per key of one line; None for a blank JSONL line; MalformedLineError."""
    obj = parse_record(raw, fmt)
    if obj is None or isinstance(obj, str):
        return None if obj is None else [splitter(obj) if splitter else [obj]]
    out = []
    for key in keys:
        if key not in obj:
            raise MalformedLineError(f"key {key!r} missing (keys present: {sorted(obj)[:8]})")
        value = obj[key]
        if isinstance(value, str):
            out.append(splitter(value) if splitter else [value])
        elif isinstance(value, list) and all(isinstance(s, str) for s in value):
            out.append(value)  # already split into sentences (Megatron-LM's _ss files)
        else:
            raise MalformedLineError(
                f"key {key!r} is {type(value).__name__}, expected a string (or a list of strings)")
    return out


def _pack(ids: List[List[int]], per_doc: List[int], eod, keep_empty: bool, dtype):
    """(tokens, sequence lengths, sequences per document, empty documents) of one key."""
    pieces, lengths, docs, num_empty, pos, eod_list = [], [], [], 0, 0, [eod]
    for n in per_doc:
        seqs = 0
        for x in ids[pos:pos + n]:
            if x:
                pieces.append(x)
                lengths.append(len(x))
                seqs += 1
        pos += n
        if seqs == 0:
            num_empty += 1
            if keep_empty:
                docs.append(0)
            continue
        if eod is not None:
            pieces.append(eod_list)
            lengths[-1] += 1
        docs.append(seqs)
    total = sum(lengths)
    tokens = np.fromiter(chain.from_iterable(pieces), dtype=dtype, count=total)
    return tokens, np.array(lengths, dtype=np.int32), np.array(docs, dtype=np.int64), num_empty


def encode_batch(batch: tuple):
    """Worker: one batch of raw lines -> (path, nbytes, num_lines_parsed, errors, packed per
    key)."""
    path, first, step, raws = batch
    fmt, keys, splitter = line_format(path), _STATE["keys"], _STATE["splitter"]
    encoder = _STATE["encoder"]
    texts: List[List[str]] = [[] for _ in keys]
    per_doc: List[List[int]] = [[] for _ in keys]
    errors, num_parsed = [], 0
    for i, raw in enumerate(raws):
        try:
            parsed = _parse(raw, fmt, keys, splitter)
        except MalformedLineError as err:
            errors.append((first + i * step, str(err)))
            continue
        if parsed is None:
            continue
        num_parsed += 1
        for k, sentences in enumerate(parsed):
            texts[k].extend(sentences)
            per_doc[k].append(len(sentences))
    eod = encoder.eod if _STATE["append_eod"] else None
    packed = [_pack(encoder.encode_batch(texts[k]), per_doc[k], eod, _STATE["keep_empty"],
                    _STATE["dtype"]) for k in range(len(keys))]
    return path, sum(map(len, raws)), num_parsed, errors, packed


class WorkerDiedError(CommandFailed):
    """An encoding worker process ended without returning its batch (killed, out of memory);
    a command ends with one `error:` line and exit code 1 (console.py)."""


def _span(batches: Sequence[tuple]) -> str:
    """'file lines a-b[, file lines c-d]' of consecutive batches (path, first, step, count)."""
    parts: List[List] = []
    for path, first, step, count in batches:
        last = first + (count - 1) * step
        if parts and parts[-1][0] == path:
            parts[-1][1], parts[-1][2] = min(parts[-1][1], first), max(parts[-1][2], last)
        else:
            parts.append([path, first, last])
    return ", ".join(f"{p} lines {a}-{b}" for p, a, b in parts)


def _exit_reason(codes: Sequence[int]) -> str:
    """What the exit codes of the dead workers say, and the likely cause."""
    killed = [c for c in codes if c == -signal.SIGKILL]
    others = [c for c in codes if c not in (0, -signal.SIGTERM, -signal.SIGKILL)]
    if killed or not others:
        how = "was killed by SIGKILL" if killed else "ended abruptly"
        return (f"{how}, most likely for using too much memory (the kernel's out-of-memory "
                "killer; see dmesg): try fewer --workers or a machine with more memory")
    desc = ", ".join(f"signal {signal.Signals(-c).name}" if c < 0 else f"exit status {c}"
                     for c in others)
    return f"ended with {desc}: if it ran out of memory, try fewer --workers"


def _worker_died(pool, procs: Sequence, in_flight: Sequence[tuple]) -> WorkerDiedError:
    pool.shutdown(wait=True, cancel_futures=True)  # reaps every worker: exit codes are known
    codes = [p.exitcode for p in procs if p.exitcode is not None]
    where = _span(in_flight) if in_flight else "the input"
    return WorkerDiedError(f"an encoding worker process died while encoding {where}: it "
                           f"{_exit_reason(codes)}; nothing was written")


class _RecordingContext:
    """A multiprocessing context that keeps every Process it creates (the pool's workers), so
    their exit codes can be read after the pool broke."""

    def __init__(self, ctx) -> None:
        self._ctx, self.processes = ctx, []

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    def Process(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
        proc = self._ctx.Process(*args, **kwargs)
        self.processes.append(proc)
        return proc


def _encoded(job: EncodeJob) -> Iterator[tuple]:
    """Encoded batches in output order: in this process (workers == 1) or in a process pool,
    at most 2 x workers + 2 batches ahead. A worker that dies (killed, out of memory) ends the
    run with WorkerDiedError naming the batches in flight (never a hang: the pool notices any
    worker's death)."""
    batches = _batches(job.paths, job.partitions, job.keep_sequential_samples)
    if job.workers <= 1:
        yield from map(encode_batch, batches)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    ctx = _RecordingContext(ctx)
    pool = ProcessPoolExecutor(job.workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(job,))
    pending: deque = deque()  # (path, first line, step, line count), future
    procs = ctx.processes
    try:
        for batch in batches:
            info = (batch[0], batch[1], batch[2], len(batch[3]))
            try:
                pending.append((info, pool.submit(encode_batch, batch)))
            except BrokenProcessPool:
                raise _worker_died(pool, procs, [i for i, _ in pending] + [info]) from None
            if len(pending) >= 2 * job.workers + 2:
                yield _result(pool, procs, pending)
        while pending:
            yield _result(pool, procs, pending)
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _result(pool, procs: Sequence, pending: deque) -> tuple:
    """The oldest pending batch's result (WorkerDiedError when a worker died)."""
    try:
        result = pending[0][1].result()
    except BrokenProcessPool:
        raise _worker_died(pool, procs, [i for i, _ in pending]) from None
    pending.popleft()
    return result


def prepare(job: EncodeJob) -> None:
    """Check the inputs and build the tokenizer (and splitter) in this process; raises
    ValueError before anything is written. Called by run_encode; call it first to time the
    start-up apart."""
    check_input_files(job.paths, fmt=line_format)
    if job.workers < 1 or job.partitions < 1:
        raise ValueError(f"workers ({job.workers}) and partitions ({job.partitions}) must be >= 1")
    _STATE.clear()
    _init_state(job)
    if job.append_eod and _STATE["encoder"].eod is None:
        raise ValueError("the tokenizer has no end-of-document (eos) token, which --append-eod "
                         "needs; pick a tokenizer with one or drop --append-eod")


def tokenizer_record(job: EncodeJob) -> dict:
    """What a dataset records of its tokenizer: the model file's hash (data/tokenizer.py, the
    manifest's kind of hash; None for vocab/merge-file tokenizers) and the vocabulary size."""
    model = job.tokenizer.tokenizer_model
    return {"tokenizer_hash": tokenizer_hash(model) if model else None,
            "vocab_size": int(_STATE["encoder"].vocab_size)}


def _record_errors(stats: EncodeStats, path: str, errors, skip: bool) -> None:
    for line_no, reason in errors:
        where = f"{path}:{line_no}: {reason}"
        if not skip:
            raise MalformedLineError(
                f"{where}; fix the line or pass --skip-malformed to skip such lines")
        stats.num_malformed_skipped += 1
        stats.first_malformed = stats.first_malformed or where


def run_encode(job: EncodeJob, progress: Optional[Callable[[int, int, int], None]] = None
               ) -> EncodeStats:
    """Run the job; progress(docs, bytes, tokens) after each batch; each finished dataset is
    renamed into place with the record of its tokenizer (writer.commit_dataset).
    Returns the counts."""
    if _STATE.get("job") is not job:
        prepare(job)
        _STATE["job"] = job
    keys = list(job.prefixes)
    stats = EncodeStats(num_documents=dict.fromkeys(keys, 0), num_tokens=dict.fromkeys(keys, 0))
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in job.prefixes.items()}
    writers: Dict[str, IndexedWriter] = {}
    start = time.perf_counter()
    try:
        for k in keys:
            os.makedirs(os.path.dirname(os.path.abspath(tmp[k])), exist_ok=True)
            remove_stale_tmp(job.prefixes[k])  # what a killed run left
            writers[k] = IndexedWriter(tmp[k], _STATE["dtype"])
        with closing(_encoded(job)) as encoded:
            _write_all(encoded, writers, keys, stats, job, progress)
        _check_not_empty(job, stats)
        for k in keys:
            writers[k].finalize()
        for k in keys:
            commit_dataset(tmp[k], job.prefixes[k], tokenizer_record(job))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        _STATE.pop("job", None)
    stats.seconds = time.perf_counter() - start
    return stats


def _write_all(encoded, writers, keys, stats: EncodeStats, job: EncodeJob, progress) -> None:
    """Append every encoded batch to the writers, in order, counting into stats."""
    for path, nbytes, num_parsed, errors, packed in encoded:
        _record_errors(stats, path, errors, job.skip_malformed)
        stats.num_parsed += num_parsed
        batch_tokens = 0
        for k, (tokens, lengths, docs, num_empty) in zip(keys, packed):
            writers[k].append(tokens, lengths, docs)
            stats.num_documents[k] += len(docs)
            stats.num_tokens[k] += int(tokens.size)
            stats.num_empty += num_empty
            batch_tokens += int(tokens.size)
        stats.num_bytes += nbytes
        if progress is not None:
            progress(num_parsed, nbytes, batch_tokens)


class EmptyInputError(ValueError):
    """The inputs hold no document with tokens (for some json key); `detail` says what was
    read."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _check_not_empty(job: EncodeJob, stats: EncodeStats) -> None:
    """EmptyInputError unless every key got tokens (or job.allow_empty)."""
    empty = [k for k, n in stats.num_tokens.items() if n == 0]
    if not empty or job.allow_empty:
        return
    detail = f"{stats.num_parsed} documents read"
    if stats.num_empty:
        detail += f", {stats.num_empty} of them without text"
    if stats.num_malformed_skipped:
        detail += f", {stats.num_malformed_skipped} malformed lines skipped"
    keys = "" if list(job.prefixes) == ["text"] else f" for json key(s) {empty}"
    raise EmptyInputError(f"input {', '.join(job.paths)} holds no document with text{keys} "
                          f"({detail}); check the input, or pass --allow-empty to write an empty "
                          "dataset", detail)
