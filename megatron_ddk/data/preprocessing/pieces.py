"""Cutting long documents into pieces at paragraph and line boundaries.

A held-out set drawn from whole documents measures those documents: with files of 30 KB and
sets of 16k tokens, one or two documents make a set. `megatron-ddk build-domains` therefore cuts
every document longer than --max-piece-bytes into pieces before the held-out draw (heldout.py draws
pieces, one per source before a second of any), and the training set joins the pieces it keeps
back into whole runs of text (build.py), so cutting changes what is held out, not the
documents training reads.

split_document is lossless: "".join(split_document(text, n)) == text, every piece is at most n
UTF-8 bytes, and a piece ends at a paragraph break (a blank line) when one lies in its second
half, else at a line end; only a line longer than n is cut inside, at whitespace when it can be.

Pure Python; imports data.preprocessing.sentences lazily (document_splitter), nothing else from
megatron_ddk.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterator, List, Optional

_WORDS = re.compile(r"\S*\s*|\S+")


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _cut_chars(word: str, max_bytes: int) -> Iterator[str]:
    """A run without whitespace, cut into pieces of at most max_bytes bytes (by characters)."""
    start, size = 0, 0
    for i, ch in enumerate(word):
        n = _nbytes(ch)
        if size + n > max_bytes and i > start:
            yield word[start:i]
            start, size = i, 0
        size += n
    if start < len(word):
        yield word[start:]


def _units(text: str, max_bytes: int) -> Iterator[str]:
    """Lines (with their endings); a line longer than max_bytes as words, a word longer than
    max_bytes as characters."""
    for line in text.splitlines(keepends=True):
        if _nbytes(line) <= max_bytes:
            yield line
            continue
        for word in _WORDS.findall(line):
            if not word:
                continue
            if _nbytes(word) <= max_bytes:
                yield word
            else:
                yield from _cut_chars(word, max_bytes)


def split_document(text: str, max_bytes: int) -> List[str]:
    """text cut into pieces of at most max_bytes UTF-8 bytes (max_bytes <= 0: never cut).

    Greedy over lines: a piece closes when the next line would not fit, at the last paragraph
    break of the piece if that lies in its second half (the rest starts the next piece)."""
    if max_bytes <= 0 or _nbytes(text) <= max_bytes:
        return [text]
    pieces: List[str] = []
    current: List[str] = []
    sizes: List[int] = []
    for unit in _units(text, max_bytes):
        n = _nbytes(unit)
        if current and sum(sizes) + n > max_bytes:
            keep = _paragraph_cut(current, sizes, max_bytes)
            pieces.append("".join(current[:keep]))
            current, sizes = current[keep:], sizes[keep:]
            if current and sum(sizes) + n > max_bytes:
                pieces.append("".join(current))
                current, sizes = [], []
        current.append(unit)
        sizes.append(n)
    if current:
        pieces.append("".join(current))
    return pieces


def _paragraph_cut(units: List[str], sizes: List[int], max_bytes: int) -> int:
    """How many of the units to close the piece with: up to the last blank line in the second
    half of the piece, else all of them."""
    total = 0
    best = len(units)
    for i, (unit, n) in enumerate(zip(units, sizes)):
        total += n
        if i + 1 < len(units) and not unit.strip() and total >= max_bytes // 2:
            best = i + 1
    return best


def document_splitter(max_piece_bytes: int = 0, split_sentences: bool = False,
                      lang: str = "english",
                      keep_newlines: bool = False) -> Optional[Callable[[str], List[str]]]:
    """text -> the sequences of one document for the preprocessing engine: punkt sentences
    (Megatron-LM --split-sentences), pieces of at most max_piece_bytes, or None (one sequence).
    ValueError when both are asked for."""
    if split_sentences and max_piece_bytes > 0:
        raise ValueError("sentence splitting and cutting documents into pieces "
                         "(max_piece_bytes) exclude each other; use one")
    if split_sentences:
        from megatron_ddk.data.preprocessing.sentences import make_splitter

        return make_splitter(lang, keep_newlines)
    if max_piece_bytes > 0:
        return functools.partial(split_document, max_bytes=max_piece_bytes)
    return None
