"""The offline teacher store's format 2, per-token values: adaptive coverage, the exact rest
bucket, the log-probability quantiser (data/store_codec.py's docstring states the scheme and its
error bound). Pure numpy, no I/O.

Imports numpy only; must not import torch, models, losses or training.
"""

from __future__ import annotations

import numpy as np


# ------------------------------------------------------------------------------ coverage
def adaptive_counts(logp: np.ndarray, top_p: float) -> np.ndarray:
    """[n] entries kept per token of [n, K] descending log-probabilities: the fewest whose
    probabilities reach top_p (at least 1; all K when top_p >= 1)."""
    n, k = logp.shape
    if top_p >= 1.0:
        return np.full(n, k, dtype=np.int64)
    cum = np.cumsum(np.exp(logp.astype(np.float64)), axis=1)
    reached = cum >= top_p
    first = np.where(reached.any(axis=1), reached.argmax(axis=1), k - 1)
    return first.astype(np.int64) + 1


def fold_rest(logp: np.ndarray, rest: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[n] log of the mass outside the kept entries: the stored rest plus the dropped entries."""
    k = logp.shape[1]
    dropped = np.arange(k)[None, :] >= counts[:, None]
    vals = np.where(dropped, logp.astype(np.float64), -np.inf)
    both = np.concatenate([vals, rest.astype(np.float64)[:, None]], axis=1)
    m = both.max(axis=1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = safe + np.log(np.exp(both - safe[:, None]).sum(axis=1))
    return np.where(np.isfinite(m), out, -np.inf)


# ------------------------------------------------------------------------------ quantiser
def quant_step(spread: np.ndarray, bits: int) -> np.ndarray:
    """Per-token grid step: spread / (2^bits - 1), rounded up to the next float16."""
    step = spread.astype(np.float64) / float((1 << bits) - 1)
    s16 = step.astype(np.float16)
    low = s16.astype(np.float64) < step
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


def quantise(gaps: np.ndarray, step16: np.ndarray, bits: int) -> np.ndarray:
    """Codes round(gap / step) in [0, 2^bits - 1] ([E] gaps, [E] float16 steps)."""
    step = step16.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step > 0, np.rint(gaps / np.where(step > 0, step, 1.0)), 0.0)
    return np.clip(codes, 0, (1 << bits) - 1).astype(np.int64)


def dequantise(codes: np.ndarray, step16: np.ndarray, token: np.ndarray, rest: np.ndarray,
               num_tokens: int) -> np.ndarray:
    """[E] log-probabilities from codes (entry e of token token[e]): exp(-code * step),
    renormalised per token to the exact mass 1 - exp(rest)."""
    gaps = codes.astype(np.float64) * step16.astype(np.float64)[token]
    w = np.exp(-gaps)  # the top entry has gap 0: every token's sum is >= 1
    total = np.bincount(token, weights=w, minlength=num_tokens)
    with np.errstate(divide="ignore"):
        kept = np.log(-np.expm1(rest.astype(np.float64)))  # log(1 - R); R = 0 gives 0
    return kept[token] - gaps - np.log(total)[token]


def delta_bound(logp: np.ndarray, counts: np.ndarray, bits: int) -> np.ndarray:
    """[n] the per-entry log-probability error bound Delta of q<bits> (module docstring)."""
    last = np.take_along_axis(logp.astype(np.float64), (counts - 1)[:, None], axis=1)[:, 0]
    return quant_step(logp[:, 0].astype(np.float64) - last, bits).astype(np.float64)
