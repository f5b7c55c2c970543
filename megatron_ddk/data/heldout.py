"""The per-domain hold-out: which whole documents go to the valid and test sets, and whether a
domain is large enough for the split that was asked for.

Three disjoint sets per domain, three roles: train (what the mixture draws), valid (DDK's
steering signal), test (reports only). One seeded permutation of the domain's documents decides
both held-out sets: documents are taken in that order into valid until they hold
valid_samples x (valid_seq_length + 1) tokens, then into test until they hold
test_samples x (test_seq_length + 1) tokens (GPTDataset samples are seq_length + 1 tokens); the
rest, in corpus order, is the training set. With the same seed the valid set is the one a
train/valid-only split chose. The held-out documents may take at most max_heldout_share of the
domain's tokens (default half), and at least one document must be left for training.

check_domains reports every too-small domain at once with the numbers (tokens needed vs
available, documents) and the largest --valid-samples that fits at the given sequence lengths;
byte_bound_problems does the same from file sizes alone (an upper bound on tokens), before any
tokenizer is trained or run.

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

    def __post_init__(self) -> None:
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
                           self.max_heldout_share)

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


def _heldout_end(lengths: np.ndarray, spec: HeldOutSpec, seed: int):
    """(order, cumulative lengths in that order, #valid documents, end of test) ."""
    order = np.random.default_rng(seed).permutation(lengths.size)
    cumulative = np.cumsum(lengths[order])
    num_valid = _take(cumulative, 0, spec.valid_tokens)
    end = (_take(cumulative, num_valid, spec.test_tokens) if num_valid < lengths.size
           else lengths.size + 1)
    return order, cumulative, num_valid, end


def plan_split(lengths: np.ndarray, spec: HeldOutSpec,
               seed: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(valid document ids, test document ids), each sorted, or None when the domain cannot
    hold them: no document would be left for training, or the held-out documents would take
    more than spec.max_heldout_share of its tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return None
    order, cumulative, num_valid, end = _heldout_end(lengths, spec, seed)
    if end >= lengths.size or cumulative[end - 1] > spec.max_heldout_share * cumulative[-1]:
        return None
    return np.sort(order[:num_valid]), np.sort(order[num_valid:end])


def max_valid_samples(lengths: np.ndarray, spec: HeldOutSpec, seed: int) -> int:
    """The largest --valid-samples (with --test-samples equal to it when test follows valid)
    that leaves training documents, at the spec's sequence lengths; 0 when none does."""
    total = int(np.sum(lengths, dtype=np.int64))
    lo, hi = 0, total // (spec.valid_seq_length + 1) + 1  # hi is never feasible
    while hi - lo > 1:  # the documents used grow with the sample count
        mid = (lo + hi) // 2
        if plan_split(lengths, spec.with_valid_samples(mid), seed) is not None:
            lo = mid
        else:
            hi = mid
    return lo


def advice(spec: HeldOutSpec) -> str:
    flags = "--valid-samples" + (" (with --test-samples, which follows it)"
                                 if spec.test_follows_valid and spec.test_samples else
                                 " / --test-samples" if spec.test_samples else "")
    return (f"lower {flags} or --valid-seq-length / --test-seq-length, drop the domain "
            "(--domains), or add data")


def shortfall(name: str, lengths: np.ndarray, spec: HeldOutSpec, seed: int) -> str:
    """The message for a domain plan_split refused: numbers, the largest fit, what to change."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(np.sum(lengths, dtype=np.int64))
    best = max_valid_samples(lengths, spec, seed)
    fit = (f"the largest --valid-samples that fits at --valid-seq-length {spec.valid_seq_length}"
           + (f" and --test-seq-length {spec.test_seq_length}" if spec.test_samples else "")
           + f" is {best}" if best else "no --valid-samples fits at these sequence lengths")
    _, cumulative, _, end = _heldout_end(lengths, spec, seed) if lengths.size else (0, 0, 0, 1)
    if end >= lengths.size:
        why = "so nothing would be left for training"
    else:
        taken = int(cumulative[end - 1])
        why = (f"and the whole documents holding them ({taken} tokens) would be "
               f"{taken / total:.0%} of it, above --max-heldout-share {spec.max_heldout_share:g}")
    return (f"domain {name}: the held-out sets need {spec.describe()} but the domain has "
            f"{total} tokens in {len(lengths)} documents, {why}; {fit}")


def check_domains(lengths: Mapping[str, np.ndarray], spec: HeldOutSpec, seed: int) -> None:
    """ValueError listing every domain too small for `spec` (all at once), with the advice."""
    problems = [shortfall(name, lens, spec, domain_seed(seed, name))
                for name, lens in lengths.items()
                if plan_split(lens, spec, domain_seed(seed, name)) is None]
    if problems:
        raise ValueError(_joined(problems, spec))


def _joined(problems: Sequence[str], spec: HeldOutSpec) -> str:
    head = f"{len(problems)} domain(s) too small for the held-out split:\n  "
    return head + "\n  ".join(problems) + f"\n{advice(spec)}"


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


def split_summary(lengths: Dict[str, np.ndarray], spec: HeldOutSpec, seed: int) -> Dict[str, int]:
    """{domain: largest --valid-samples that fits} (for a preflight table)."""
    return {name: max_valid_samples(lens, spec, domain_seed(seed, name))
            for name, lens in lengths.items()}
