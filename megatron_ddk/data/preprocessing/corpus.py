"""Raw domain corpora: documents from JSONL or plain-text files, domain folders, and the text
sample a tokenizer is trained on.

Owns the input formats (documented in docs/data.md):
- JSONL (.jsonl, .json): one JSON object per line; each key in `json_keys` names a string field
  that is one document. Whitespace-only lines are ignored.
- plain text (.txt): one document per line (the line without its "\\n" or "\\r\\n" ending).
A malformed line (invalid UTF-8 or JSON, not an object, key missing or not a string) is an error
that names file and line, or, when the caller asks for it, is skipped and counted.

This module must stay cheap to import: no torch, no megatron.core, nothing else from megatron_ddk.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
DOMAIN_SUFFIXES = (".jsonl", ".txt")
"""Suffixes discover_domains picks up in a corpus folder (not .json: summaries, configs)."""
DOMAIN_NAME_RULE = "[A-Za-z0-9][A-Za-z0-9_.-]*"
"""What a domain name must match (it names a folder and a manifest entry)."""
_DOMAIN_NAME = re.compile(f"^{DOMAIN_NAME_RULE}$")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def domain_name(label: str) -> Optional[str]:
    """A label (a field value, a cluster id) made a domain name: runs of characters outside
    DOMAIN_NAME_RULE become one "_", leading and trailing "_", "." and "-" are dropped
    ("Wikipedia (en)" -> "Wikipedia_en", "Pile-CC" stays); None when nothing is left."""
    name = _NOT_NAME.sub("_", label).strip("_.-")
    return name if name and _DOMAIN_NAME.match(name) else None


class MalformedLineError(ValueError):
    """A line that is not a JSON object with the requested string fields."""


def input_format(path: str) -> str:
    """'jsonl' or 'txt' from the file name; ValueError for anything else."""
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(TEXT_SUFFIXES):
        return "txt"
    raise ValueError(
        f"input file {path}: unsupported suffix; use .jsonl/.json (one JSON object per line) "
        "or .txt (one document per line)"
    )


def check_input_files(paths: Sequence[str], fmt=None) -> None:
    """ValueError naming the first input that is missing, not a file, or of unknown format
    (`fmt(path)` raises for an unknown one; default input_format)."""
    if not paths:
        raise ValueError("no input files given")
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"input file {path} does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"input {path} is not a regular file")
        (fmt or input_format)(path)


def parse_record(raw: bytes, fmt: str) -> Union[None, str, dict]:
    """One raw line as a record: txt, the line without its "\\n" / "\\r\\n"; JSONL, the JSON
    object, or None for a blank line. The one line parser of the package (corpus reading,
    preprocessing, the mixed-corpus readers). MalformedLineError names the reason (without file
    and line, which the caller adds)."""
    if fmt == "txt":
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MalformedLineError(f"invalid UTF-8 ({err.reason} at byte {err.start})") from None
        return line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as err:
        raise MalformedLineError(f"invalid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise MalformedLineError(f"invalid JSON ({err.msg}: column {err.colno})") from None
    if not isinstance(obj, dict):
        raise MalformedLineError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_line(raw: bytes, fmt: str, json_keys: Sequence[str]) -> Optional[Tuple[str, ...]]:
    """The documents on one raw line, one per json key (txt: the line itself).

    Returns None for a line to ignore (blank JSONL line). Raises MalformedLineError with the
    reason (without file and line, which the caller adds).
    """
    obj = parse_record(raw, fmt)
    if obj is None or isinstance(obj, str):
        return None if obj is None else (obj,)
    docs = []
    for key in json_keys:
        if key not in obj:
            raise MalformedLineError(f"key {key!r} missing (keys present: {sorted(obj)[:8]})")
        value = obj[key]
        if not isinstance(value, str):
            raise MalformedLineError(f"key {key!r} is {type(value).__name__}, expected a string")
        docs.append(value)
    return tuple(docs)


def iter_raw_lines(paths: Sequence[str]) -> Iterator[Tuple[str, int, bytes]]:
    """(path, 1-based line number, raw bytes) of every line of every file, in order."""
    for path in paths:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                yield path, line_no, raw


@dataclass
class ReadCounts:
    """What a read skipped (filled in by iter_documents)."""

    num_malformed_skipped: int = 0
    """Malformed lines skipped (only with skip_malformed)."""

    first_malformed: str = ""
    """'file:line: reason' of the first skipped malformed line, for the log."""


def iter_documents(
    paths: Sequence[str],
    json_keys: Sequence[str] = ("text",),
    skip_malformed: bool = False,
    counts: Optional[ReadCounts] = None,
) -> Iterator[Tuple[str, ...]]:
    """Documents (one tuple per line, one entry per key) of the input files, in order."""
    check_input_files(paths)
    counts = counts if counts is not None else ReadCounts()
    for path, line_no, raw in iter_raw_lines(paths):
        try:
            docs = parse_line(raw, input_format(path), json_keys)
        except MalformedLineError as err:
            where = f"{path}:{line_no}: {err}"
            if not skip_malformed:
                raise MalformedLineError(
                    f"{where}; fix the line or pass --skip-malformed to skip such lines"
                ) from None
            counts.num_malformed_skipped += 1
            counts.first_malformed = counts.first_malformed or where
            continue
        if docs is not None:
            yield docs


@dataclass
class DomainInput:
    """The raw files of one domain found in a corpus folder."""

    name: str
    """Domain name: the file stem (<name>.jsonl) or the sub-folder name (<name>/*.jsonl)."""

    paths: List[str]
    """Absolute input files of the domain, sorted."""


def _data_files(folder: str) -> List[str]:
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if f.lower().endswith(DOMAIN_SUFFIXES)
        and os.path.isfile(os.path.join(folder, f))
    )


def discover_domains(folder: str) -> List[DomainInput]:
    """Domains of a corpus folder: each <name>.jsonl or <name>.txt file, or each <name>/
    sub-folder holding such files, is one domain. Sorted by name; ValueError when none."""
    if not os.path.isdir(folder):
        raise ValueError(f"corpus folder {folder} does not exist or is not a folder")
    folder = os.path.abspath(folder)
    found = {}
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if os.path.isdir(full):
            name, paths = entry, _data_files(full)
            if not paths:
                continue
        elif entry.lower().endswith(DOMAIN_SUFFIXES):
            name, paths = os.path.splitext(entry)[0], [full]
        else:
            continue
        if not _DOMAIN_NAME.match(name):
            raise ValueError(f"corpus folder {folder}: domain name {name!r} (from {full}) must "
                             "match [A-Za-z0-9][A-Za-z0-9_.-]*; rename the file or folder")
        if name in found:
            raise ValueError(f"corpus folder {folder}: domain {name!r} appears twice "
                             f"({found[name].paths[0]} and {full}); keep one")
        found[name] = DomainInput(name=name, paths=paths)
    if not found:
        raise ValueError(f"corpus folder {folder} holds no domain files (*.jsonl, *.txt or "
                         "sub-folders of them)")
    return [found[n] for n in sorted(found)]


def _sentences(doc: str, max_sentence_bytes: int) -> Iterator[str]:
    """Non-empty lines of a document, long lines cut so each fits max_sentence_bytes."""
    max_chars = max(1, max_sentence_bytes // 4)  # a UTF-8 character is at most 4 bytes
    for line in doc.split("\n"):
        if not line:
            continue
        if len(line.encode("utf-8")) <= max_sentence_bytes:
            yield line
        else:
            for start in range(0, len(line), max_chars):
                yield line[start:start + max_chars]


def sample_domain_text(
    paths: Sequence[str],
    budget_bytes: int,
    seed: int,
    json_key: str = "text",
    max_sentence_bytes: int = 4096,
    skip_malformed: bool = False,
) -> List[str]:
    """Lines ("sentences" for SentencePiece) sampled from one domain, about budget_bytes of them.

    One pass over the files: each document is kept with probability ~budget/size, so the sample
    spreads over the whole domain instead of its first files. A domain smaller than its budget
    is taken whole. Deterministic for a given seed.
    """
    total = sum(os.path.getsize(p) for p in paths)
    keep_prob = 1.0 if total <= budget_bytes else min(1.0, 1.2 * budget_bytes / total)
    rng = random.Random(seed)
    out: List[str] = []
    taken = 0
    for (doc,) in iter_documents(paths, (json_key,), skip_malformed=skip_malformed):
        if rng.random() >= keep_prob:
            continue
        for sentence in _sentences(doc, max_sentence_bytes):
            out.append(sentence)
            taken += len(sentence.encode("utf-8")) + 1
        if taken >= budget_bytes:
            break
    logger.info("sampled %d lines (%d bytes) from %s", len(out), taken, paths[0])
    return out
