"""The per-domain hold-out: which documents (or pieces of them) go to the valid and test sets,
and whether a domain is large enough for the split that was asked for.

Three disjoint sets per domain, three roles: train (what the mixture draws), valid (DDK's
steering signal), test (reports only). The units drawn are documents, or the pieces of them that
pieces.py cut (`megatron-ddk build-domains` --max-piece-bytes); each unit knows its source (the
input document it came from). One seeded permutation of the units, reordered so that every
source gives its first unit before any source gives a second (then second units, and so on),
decides both held-out sets: units are taken in that order into valid until they hold
valid_samples x (valid_seq_length + 1) tokens, then into test until they hold
test_samples x (test_seq_length + 1) tokens (GPTDataset samples are seq_length + 1 tokens); the
rest, in corpus order, is the training set. So a held-out set spreads over as many sources as
the domain has, and a corpus of a few long documents still yields many held-out pieces. With one
unit per source and the same seed the valid set is the one a train/valid-only split chose.

Each held-out set must hold at least min_documents units (--min-heldout-documents): a set of
one or two documents measures those documents, not the domain. The held-out units may take at
most max_heldout_share of the domain's tokens (default half), and at least one unit must be
left for training.

check_domains reports every domain that cannot be split at once with the numbers (tokens needed
vs available, documents, sources) and what to change; byte_bound_problems does the same from
file sizes alone (an upper bound on tokens), before any tokenizer is trained or run.

Pure numpy; imports nothing from megatron_ddk or megatron.core.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

MAX_EXTRA_TOKENS_PER_DOCUMENT = 3
"""Upper bound on tokens a document can have beyond its UTF-8 bytes: EOD, a BOS some tokenizers
add, SentencePiece's dummy-prefix piece. Byte-fallback tokenizers emit at most one token per
byte, and a JSONL line is never shorter than the UTF-8 text it holds."""


@dataclass(frozen=True)
class HeldOutSpec:
    """What the held-out sets of every domain must hold."""

    valid_samples: int
    """Validation samples per domain (--valid-samples)."""

    valid_seq_length: int
    """Tokens per validation sample (--valid-seq-length); each needs one more token."""

    test_samples: int
    """Test samples per domain (--test-samples); 0 writes no test set."""

    test_seq_length: int
    """Tokens per test sample (--test-seq-length)."""

    test_follows_valid: bool = True
    """Whether --test-samples was left at its default (= --valid-samples); the advice then
    lowers both together."""

    max_heldout_share: float = 0.5
    """Largest share of a domain's tokens the held-out documents may take
    (--max-heldout-share); the rest trains."""

    min_documents: int = 1
    """Fewest documents (or pieces) each held-out set must hold (--min-heldout-documents;
    `megatron-ddk build-domains` and the pipeline default to 16)."""

    def __post_init__(self) -> None:
        if self.min_documents < 1:
            raise ValueError(f"--min-heldout-documents ({self.min_documents}) must be >= 1")
        if not 0.0 < self.max_heldout_share < 1.0:
            raise ValueError(f"--max-heldout-share ({self.max_heldout_share}) must be in (0, 1)")
        if self.valid_samples < 1 or self.valid_seq_length < 1:
            raise ValueError(f"--valid-samples ({self.valid_samples}) and --valid-seq-length "
                             f"({self.valid_seq_length}) must be >= 1")
        if self.test_samples < 0 or self.test_seq_length < 1:
            raise ValueError(f"--test-samples ({self.test_samples}) must be >= 0 and "
                             f"--test-seq-length ({self.test_seq_length}) >= 1")

    @property
    def valid_tokens(self) -> int:
        """Tokens the valid set needs: valid_samples x (valid_seq_length + 1)."""
        return self.valid_samples * (self.valid_seq_length + 1)

    @property
    def test_tokens(self) -> int:
        """Tokens the test set needs: test_samples x (test_seq_length + 1)."""
        return self.test_samples * (self.test_seq_length + 1)

    def with_valid_samples(self, n: int) -> "HeldOutSpec":
        """The same spec with n validation samples (and n test samples when test follows)."""
        return HeldOutSpec(n, self.valid_seq_length,
                           n if self.test_follows_valid and self.test_samples else
                           self.test_samples, self.test_seq_length, self.test_follows_valid,
                           self.max_heldout_share, self.min_documents)

    def describe(self) -> str:
        """'valid 500 x 4097 + test 500 x 4097 = 4097000 tokens'."""
        text = f"valid {self.valid_samples} x {self.valid_seq_length + 1}"
        if self.test_samples:
            text += f" + test {self.test_samples} x {self.test_seq_length + 1}"
        return f"{text} = {self.valid_tokens + self.test_tokens} tokens"


def domain_seed(seed: int, name: str) -> int:
    """The hold-out seed of one domain: adding a domain does not change the others' split."""
    return (int(seed) + zlib.crc32(name.encode("utf-8"))) % (2**32)


def _take(cumulative: np.ndarray, start: int, target: int) -> int:
    """End index (exclusive) of the shortest run order[start:end] holding >= target tokens;
    len + 1 when the rest of the order cannot reach it."""
    if target <= 0:
        return start
    base = int(cumulative[start - 1]) if start > 0 else 0
    return int(np.searchsorted(cumulative, base + target)) + 1


def draw_order(num_units: int, seed: int, sources: Optional[np.ndarray] = None) -> np.ndarray:
    """The held-out draw order: a seeded permutation of the units, stably reordered by how many
    earlier units of the same source it holds (every source's first unit, then every second
    unit, ...). Without sources (one unit per document) it is the permutation itself."""
    order = np.random.default_rng(seed).permutation(num_units)
    if sources is None:
        return order
    src = np.asarray(sources, dtype=np.int64)[order]
    by_source = np.argsort(src, kind="stable")  # positions grouped by source, in order
    sorted_src = src[by_source]
    starts = np.flatnonzero(np.r_[True, sorted_src[1:] != sorted_src[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, sorted_src.size]))
    rank = np.empty(num_units, dtype=np.int64)
    rank[by_source] = np.arange(num_units) - group_start
    return order[np.argsort(rank, kind="stable")]


@dataclass(frozen=True)
class _Draw:
    """One domain's held-out draw: the order, its cumulative tokens, the set boundaries."""

    order: np.ndarray
    cumulative: np.ndarray
    num_valid: int
    end: int


def _draw(lengths: np.ndarray, spec: HeldOutSpec, seed: int,
          sources: Optional[np.ndarray]) -> _Draw:
    order = draw_order(lengths.size, seed, sources)
    cumulative = np.cumsum(lengths[order])
    num_valid = _take(cumulative, 0, spec.valid_tokens)
    end = (_take(cumulative, num_valid, spec.test_tokens) if num_valid < lengths.size
           else lengths.size + 1)
    return _Draw(order, cumulative, num_valid, end)


def _problem(lengths: np.ndarray, spec: HeldOutSpec, draw: _Draw) -> Optional[str]:
    """None when the draw is a valid split, else 'size' or 'floor'."""
    if draw.end >= lengths.size or \
            draw.cumulative[draw.end - 1] > spec.max_heldout_share * draw.cumulative[-1]:
        return "size"
    num_test = draw.end - draw.num_valid
    if draw.num_valid < spec.min_documents or (spec.test_samples and
                                               num_test < spec.min_documents):
        return "floor"
    return None


def plan_split(lengths: np.ndarray, spec: HeldOutSpec, seed: int,
               sources: Optional[np.ndarray] = None) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(valid unit ids, test unit ids), each sorted, or None when the domain cannot hold them:
    no unit would be left for training, the held-out units would take more than
    spec.max_heldout_share of its tokens, or a set would hold fewer than spec.min_documents
    units. sources[i] is the source document of unit i (None: every unit is its own)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return None
    draw = _draw(lengths, spec, seed, sources)
    if _problem(lengths, spec, draw) is not None:
        return None
    return (np.sort(draw.order[:draw.num_valid]),
            np.sort(draw.order[draw.num_valid:draw.end]))


def max_valid_samples(lengths: np.ndarray, spec: HeldOutSpec, seed: int,
                      sources: Optional[np.ndarray] = None) -> int:
    """The largest --valid-samples (with --test-samples equal to it when test follows valid)
    that leaves training documents within --max-heldout-share, at the spec's sequence lengths
    (the document floor aside); 0 when none does."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(np.sum(lengths, dtype=np.int64))
    lo, hi = 0, total // (spec.valid_seq_length + 1) + 1  # hi is never feasible
    while hi - lo > 1:  # the documents used grow with the sample count
        mid = (lo + hi) // 2
        trial = spec.with_valid_samples(mid)
        if lengths.size and _problem(lengths, trial, _draw(lengths, trial, seed, sources)) \
                in (None, "floor"):
            lo = mid
        else:
            hi = mid
    return lo


def set_summary(unit_ids: np.ndarray, lengths: np.ndarray,
                sources: Optional[np.ndarray]) -> Tuple[int, int, int]:
    """(documents, distinct sources, tokens) of a set of units."""
    ids = np.asarray(unit_ids, dtype=np.int64)
    num_sources = ids.size if sources is None else int(np.unique(
        np.asarray(sources, dtype=np.int64)[ids]).size)
    return int(ids.size), num_sources, int(np.sum(np.asarray(lengths)[ids], dtype=np.int64))


def advice(spec: HeldOutSpec) -> str:
    flags = "--valid-samples" + (" (with --test-samples, which follows it)"
                                 if spec.test_follows_valid and spec.test_samples else
                                 " / --test-samples" if spec.test_samples else "")
    return (f"lower {flags} or --valid-seq-length / --test-seq-length, drop the domain "
            "(--domains), or add data")


def _floor_shortfall(name: str, lengths: np.ndarray, spec: HeldOutSpec, draw: _Draw,
                     sources: Optional[np.ndarray]) -> str:
    total = int(np.sum(lengths, dtype=np.int64))
    num_sources = lengths.size if sources is None else int(np.unique(sources).size)
    sets = [("valid", draw.order[:draw.num_valid])]
    if spec.test_samples:
        sets.append(("test", draw.order[draw.num_valid:draw.end]))
    held = ", ".join(f"the {role} set {ids.size} (from {set_summary(ids, lengths, sources)[1]} "
                     "sources)" for role, ids in sets)
    return (f"domain {name}: each held-out set needs at least {spec.min_documents} documents "
            f"(--min-heldout-documents) but {spec.describe()} would hold {held}: its "
            f"{lengths.size} documents from {num_sources} sources average "
            f"{total // max(lengths.size, 1)} tokens; lower --max-piece-bytes so long "
            "documents are cut into more pieces, raise --valid-samples / --test-samples, or "
            "lower --min-heldout-documents")


def shortfall(name: str, lengths: np.ndarray, spec: HeldOutSpec, seed: int,
              sources: Optional[np.ndarray] = None) -> str:
    """The message for a domain plan_split refused: numbers, the largest fit, what to change."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(np.sum(lengths, dtype=np.int64))
    if not lengths.size:
        return f"domain {name}: it holds no document with tokens"
    draw = _draw(lengths, spec, seed, sources)
    if _problem(lengths, spec, draw) == "floor":
        return _floor_shortfall(name, lengths, spec, draw, sources)
    best = max_valid_samples(lengths, spec, seed, sources)
    fit = (f"the largest --valid-samples that fits at --valid-seq-length {spec.valid_seq_length}"
           + (f" and --test-seq-length {spec.test_seq_length}" if spec.test_samples else "")
           + f" is {best}" if best else "no --valid-samples fits at these sequence lengths")
    if draw.end >= lengths.size:
        why = "so nothing would be left for training"
    else:
        taken = int(draw.cumulative[draw.end - 1])
        why = (f"and the whole documents holding them ({taken} tokens) would be "
               f"{taken / total:.0%} of it, above --max-heldout-share {spec.max_heldout_share:g}")
    return (f"domain {name}: the held-out sets need {spec.describe()} but the domain has "
            f"{total} tokens in {len(lengths)} documents, {why}; {fit}")


def check_domains(lengths: Mapping[str, np.ndarray], spec: HeldOutSpec, seed: int,
                  sources: Optional[Mapping[str, np.ndarray]] = None) -> None:
    """ValueError listing every domain that cannot be split by `spec` (all at once), with the
    advice. sources[name] maps each unit of a domain to its source document."""
    sources = sources or {}
    problems, too_small = [], 0
    for name, lens in lengths.items():
        seed_i, src = domain_seed(seed, name), sources.get(name)
        lens = np.asarray(lens, dtype=np.int64)
        if plan_split(lens, spec, seed_i, src) is None:
            problems.append(shortfall(name, lens, spec, seed_i, src))
            too_small += not lens.size or \
                _problem(lens, spec, _draw(lens, spec, seed_i, src)) == "size"
    if problems:
        raise ValueError(_joined(problems, spec, too_small == len(problems), too_small > 0))


def _joined(problems: Sequence[str], spec: HeldOutSpec, all_size: bool = True,
            any_size: bool = True) -> str:
    what = "too small for" if all_size else "cannot hold"
    head = f"{len(problems)} domain(s) {what} the held-out split:\n  "
    return head + "\n  ".join(problems) + (f"\n{advice(spec)}" if any_size else "")


def _count_lines(paths: Sequence[str]) -> int:
    lines = 0
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                lines += block.count(b"\n")
        lines += 1  # a last line without a newline
    return lines


def byte_bound_problems(domains: Mapping[str, Sequence[str]], spec: HeldOutSpec) -> List[str]:
    """Domains that certainly cannot hold the held-out sets, judged from their files' sizes:
    a domain has at most bytes + MAX_EXTRA_TOKENS_PER_DOCUMENT x lines tokens, and the held-out
    sets may take max_heldout_share of them. Cheap (lines are counted only for domains the size
    alone does not decide); the exact check comes after tokenization (check_domains)."""
    need = spec.valid_tokens + spec.test_tokens
    share = spec.max_heldout_share
    out = []
    for name, paths in domains.items():
        size = sum(os.path.getsize(p) for p in paths)
        if size * share >= need:
            continue
        bound = size * (1 + MAX_EXTRA_TOKENS_PER_DOCUMENT)
        if bound * share >= need:
            bound = size + MAX_EXTRA_TOKENS_PER_DOCUMENT * _count_lines(paths)
        if bound * share < need:
            tied = spec.test_follows_valid and spec.test_samples
            per_sample = (spec.valid_seq_length + 1) + (spec.test_seq_length + 1 if tied else 0)
            room = int(bound * share) - (0 if tied else spec.test_tokens)
            out.append(f"domain {name}: the held-out sets need {spec.describe()} but its "
                       f"{size} bytes of files hold at most {bound} tokens, and held-out sets "
                       f"may take {share:g} of them (--max-heldout-share); at most "
                       f"{max(0, room // per_sample)} --valid-samples could fit at these "
                       "sequence lengths (a bound; --dry-run measures the exact figure)")
    return out


def check_byte_bounds(domains: Mapping[str, Sequence[str]], spec: HeldOutSpec) -> None:
    """ValueError listing every domain byte_bound_problems finds (all at once)."""
    problems = byte_bound_problems(domains, spec)
    if problems:
        raise ValueError(_joined(problems, spec))


def split_summary(lengths: Dict[str, np.ndarray], spec: HeldOutSpec, seed: int,
                  sources: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, int]:
    """{domain: largest --valid-samples that fits} (for a preflight table)."""
    sources = sources or {}
    return {name: max_valid_samples(lens, spec, domain_seed(seed, name), sources.get(name))
            for name, lens in lengths.items()}
