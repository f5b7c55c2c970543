"""The pure arithmetic of DDK: Eq. 1, Eq. 2 and the weight bookkeeping around them.

Everything here is a function of numpy arrays over domains (1-D, float64) and returns new arrays;
nothing keeps state. Perplexity ratios are handled in log space: ppl_S / ppl_T = exp(loss_S -
loss_T), and the softmax of Eq. 1 / the product of Eq. 2 are evaluated as a log-sum-exp, so a
student that is 1e4 times worse than its teacher (or far more) still gives finite weights.

- discrepancy_factor(ppl_student, ppl_teacher)        Eq. 1: softmax of the ppl ratios
- smooth_update(r, ppl_student, ppl_teacher, alpha)   Eq. 2: r * exp(ratio), renormalised, mixed
                                                      with the uniform (1 - alpha) / N
- the same two from mean CE losses (*_from_losses) or from ratios (*_from_ratio)
- largest_remainder_counts(weights, total)            exact integer split of `total`
- bound_weights / apply_floor_cap / apply_repetition_cap   box constraints, then renormalised
- paired_log_ratio(per-sample losses of S and T)      one domain's log ratio, its standard error
  and ratio_interval(...) its 95% interval; t_critical(df) the Student-t multiplier

Must not import torch, torch.distributed or anything doing I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import numpy as np

MAX_LOG_RATIO = 700.0
"""Log perplexity ratios are clipped here (ratio ~ 1e304): beyond it exp() would overflow, and
Eq. 1 / Eq. 2 already give a one-hot result long before."""

_BOUND_TOL = 1e-12


def _as_domain_vector(values, name: str, positive: bool = False) -> np.ndarray:
    """`values` as a finite 1-D float64 array; ValueError naming `name` otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence over domains, got shape "
                         f"{arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}={arr.tolist()}: every value must be finite (a NaN or inf loss "
                         f"means the model or the evaluation diverged)")
    if positive and np.any(arr <= 0):
        raise ValueError(f"{name}={arr.tolist()}: every value must be > 0")
    return arr


def _check_same_size(*arrays: np.ndarray) -> None:
    sizes = {a.size for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"per-domain arrays differ in length: {[a.size for a in arrays]}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    """exp(logits) / sum exp(logits), stable; -inf entries get exactly 0."""
    shifted = logits - np.max(logits)
    e = np.exp(shifted)
    return e / e.sum()


def log_perplexity_ratio(loss_student, loss_teacher) -> np.ndarray:
    """log(ppl_S / ppl_T) = loss_S - loss_T per domain, clipped at MAX_LOG_RATIO."""
    ls = _as_domain_vector(loss_student, "loss_student")
    lt = _as_domain_vector(loss_teacher, "loss_teacher")
    _check_same_size(ls, lt)
    return np.minimum(ls - lt, MAX_LOG_RATIO)


def perplexity_ratio(loss_student, loss_teacher) -> np.ndarray:
    """ppl_S / ppl_T = exp(loss_S - loss_T) per domain (finite: the exponent is clipped)."""
    return np.exp(log_perplexity_ratio(loss_student, loss_teacher))


def _ratio_from_ppl(ppl_student, ppl_teacher) -> np.ndarray:
    ps = _as_domain_vector(ppl_student, "ppl_student", positive=True)
    pt = _as_domain_vector(ppl_teacher, "ppl_teacher", positive=True)
    _check_same_size(ps, pt)
    with np.errstate(over="ignore"):  # an overflowing quotient is clipped like a huge one
        return np.minimum(ps / pt, np.exp(MAX_LOG_RATIO))


def discrepancy_factor_from_ratio(ratio) -> np.ndarray:
    """Eq. 1 given ratio[i] = ppl_S[i] / ppl_T[i]: softmax(ratio)."""
    return _softmax(_as_domain_vector(ratio, "ratio"))


def smooth_update_from_ratio(r, ratio, alpha: float = 0.5) -> np.ndarray:
    """Eq. 2 given the previous factor r and ratio[i] = ppl_S[i] / ppl_T[i].

    psi = r * exp(ratio) is normalised as softmax(log r + ratio), so neither exp(ratio) nor the
    product can overflow; domains with r = 0 keep psi = 0 (and only the uniform share).
    """
    r = _as_domain_vector(r, "r")
    ratio = _as_domain_vector(ratio, "ratio")
    _check_same_size(r, ratio)
    if np.any(r < 0) or r.sum() <= 0:
        raise ValueError(f"r={r.tolist()}: weights must be >= 0 with a positive sum")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1] (ddk.alpha)")
    with np.errstate(divide="ignore"):
        log_psi = np.log(r) + ratio
    return alpha * _softmax(log_psi) + (1.0 - alpha) / r.size


def discrepancy_factor(ppl_student, ppl_teacher) -> np.ndarray:
    """Eq. 1: r[i] = exp(ppl_S[i] / ppl_T[i]) / sum_j exp(ppl_S[j] / ppl_T[j])."""
    return discrepancy_factor_from_ratio(_ratio_from_ppl(ppl_student, ppl_teacher))


def smooth_update(r, ppl_student, ppl_teacher, alpha: float = 0.5) -> np.ndarray:
    """Eq. 2: psi = r * exp(ppl_S / ppl_T); r_next = alpha * psi / sum(psi) + (1 - alpha) / N."""
    return smooth_update_from_ratio(r, _ratio_from_ppl(ppl_student, ppl_teacher), alpha)


def discrepancy_factor_from_losses(loss_student, loss_teacher) -> np.ndarray:
    """Eq. 1 from per-domain mean CE losses (nats): ppl ratio = exp(loss_S - loss_T)."""
    return discrepancy_factor_from_ratio(perplexity_ratio(loss_student, loss_teacher))


def smooth_update_from_losses(r, loss_student, loss_teacher, alpha: float = 0.5) -> np.ndarray:
    """Eq. 2 from per-domain mean CE losses (nats)."""
    return smooth_update_from_ratio(r, perplexity_ratio(loss_student, loss_teacher), alpha)


# A vector whose sum is this close to 1 is already a distribution up to float rounding (N
# additions of values <= 1 err by at most N ulp, ~1e-15 for any realistic N).
_DISTRIBUTION_TOLERANCE = 1e-12


def normalize_weights(weights, name: str = "weights") -> np.ndarray:
    """weights / sum(weights); ValueError unless all >= 0 with a positive sum.

    A vector that already sums to 1 up to float rounding is returned unchanged (as a copy):
    dividing by a sum of 1 - 1e-16 would move its last digits, so normalising twice would not
    give the same floats. This makes the function idempotent, and the weights a policy chose are
    the weights the mixture applies and the records log, bit for bit, on every CPU.
    """
    w = _as_domain_vector(weights, name)
    total = w.sum()
    if np.any(w < 0) or total <= 0:
        raise ValueError(f"{name}={w.tolist()}: weights must be >= 0 with a positive sum")
    if abs(total - 1.0) <= _DISTRIBUTION_TOLERANCE:
        return w.copy()
    return w / total


def largest_remainder_counts(weights, total: int) -> np.ndarray:
    """Split `total` items over domains in proportion to `weights` (Hamilton's method).

    Each domain first gets floor(share), share = total * w[i] / sum(w); the items left over go one
    each to the largest fractional parts (ties: lower domain index). The counts sum to `total`
    exactly and |count[i] - share[i]| < 1; a zero weight gets zero. The arithmetic is exact
    (rationals of the float weights), so the result does not depend on rounding.
    """
    w = normalize_weights(weights)
    total = int(total)
    if total < 0:
        raise ValueError(f"total={total}: must be >= 0")
    fw = [Fraction(float(x)) for x in w]
    denom = sum(fw)
    shares = [x * total / denom for x in fw]
    counts = np.array([s.numerator // s.denominator for s in shares], dtype=np.int64)
    left = total - int(counts.sum())
    if left:
        fractions = [s - int(c) for s, c in zip(shares, counts)]
        order = sorted(range(len(fractions)), key=lambda i: (-fractions[i], i))
        counts[order[:left]] += 1
    return counts


def bound_weights(weights, lower, upper) -> np.ndarray:
    """The distribution out[i] = clip(s * w[i], lower[i], upper[i]) with sum(out) = 1.

    Domains keep their proportions except where a bound binds: mass taken from a capped domain, or
    given to a floored one, is spread over the free domains in proportion to their weights.
    Domains with w[i] = 0 stay at 0 (their lower bound is ignored). The scale s is found exactly
    on the piecewise-linear, nondecreasing f(s) = sum clip(s * w, lower, upper).
    Raises ValueError when the bounds cannot hold (sum of lower > 1 or sum of upper < 1).
    """
    w = normalize_weights(weights)
    lo = np.broadcast_to(np.asarray(lower, dtype=np.float64), w.shape).copy()
    hi = np.broadcast_to(np.asarray(upper, dtype=np.float64), w.shape).copy()
    active = w > 0
    lo[~active] = 0.0
    hi[~active] = 0.0
    lo = np.minimum(lo, hi)
    if lo.sum() > 1.0 + _BOUND_TOL:
        raise ValueError(f"weight lower bounds {lo.tolist()} sum to {lo.sum():.6g} > 1: no "
                         f"distribution can meet them (lower ddk.weight_floor)")
    if hi.sum() < 1.0 - _BOUND_TOL:
        raise ValueError(f"weight upper bounds {hi.tolist()} sum to {hi.sum():.6g} < 1: no "
                         f"distribution can meet them (raise ddk.weight_cap or "
                         f"ddk.max_epochs_per_domain)")

    def mass(s: float) -> float:
        return float(np.clip(s * w, lo, hi).sum())

    wa = w[active]
    breaks = np.unique(np.concatenate([lo[active] / wa, hi[active] / wa]))
    prev = 0.0
    for b in breaks:
        if mass(b) >= 1.0:
            mid = 0.5 * (prev + b)
            free = active & (mid * w > lo) & (mid * w < hi)
            if not free.any():  # f is flat at 1 on this segment
                s = b
            else:
                fixed = float(np.clip(mid * w, lo, hi)[~free].sum())
                s = (1.0 - fixed) / float(w[free].sum())
            out = np.clip(s * w, lo, hi)
            return out / out.sum()
        prev = b
    out = hi.copy()  # sum(hi) ~ 1 within tolerance
    return out / out.sum()


def apply_floor_cap(weights, floor: Optional[float] = None,
                    cap: Optional[float] = None) -> np.ndarray:
    """Keep every domain with positive weight within [floor, cap], renormalised (bound_weights).

    None disables a bound. Zero-weight domains stay at zero.
    """
    lower = 0.0 if floor is None else float(floor)
    upper = 1.0 if cap is None else float(cap)
    if lower < 0 or upper <= 0:
        raise ValueError(f"weight floor={floor}, cap={cap}: floor must be >= 0 and cap > 0")
    return bound_weights(weights, lower, upper)


def repetition_upper_bounds(epochs_used, max_epochs: float,
                            interval_epochs: Optional[Sequence[float]] = None) -> np.ndarray:
    """Largest weight per domain that keeps it within `max_epochs` passes over its data.

    epochs_used[i]: passes already consumed (fractional). Without interval_epochs the bound is 0
    for a domain at or past the cap and 1 otherwise. With interval_epochs[i] = epochs that a whole
    interval at weight 1 would consume (samples per interval / samples per epoch), the bound is the
    remaining budget (max_epochs - epochs_used[i]) / interval_epochs[i], so the coming interval
    cannot overshoot either.
    """
    used = _as_domain_vector(epochs_used, "epochs_used")
    if max_epochs <= 0:
        raise ValueError(f"max_epochs={max_epochs}: must be > 0 (ddk.max_epochs_per_domain)")
    left = np.maximum(float(max_epochs) - used, 0.0)
    if interval_epochs is None:
        return (left > 0).astype(np.float64)
    per = _as_domain_vector(interval_epochs, "interval_epochs", positive=True)
    _check_same_size(used, per)
    return np.minimum(left / per, 1.0)


def apply_repetition_cap(weights, epochs_used, max_epochs: float,
                         interval_epochs: Optional[Sequence[float]] = None) -> np.ndarray:
    """Clip domains that reached `max_epochs` (to zero, or to their remaining budget when
    interval_epochs is given) and renormalise the rest (bound_weights)."""
    return bound_weights(weights, 0.0, repetition_upper_bounds(epochs_used, max_epochs,
                                                               interval_epochs))


# Two-sided 95% critical values t(0.975, df) for df = 1..30 (standard tables); df > 30 uses the
# Cornish-Fisher expansion around the normal quantile, accurate to < 1e-3 there.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_critical(df: int) -> float:
    """t(0.975, df), the multiplier of a two-sided 95% interval."""
    if df < 1:
        raise ValueError(f"t interval needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class LogRatioEstimate:
    """One domain's log perplexity ratio log(ppl_S / ppl_T) measured on paired samples."""

    log_ratio: float
    """The token-weighted mean of d_i = CE_S_i - CE_T_i: exactly loss_S - loss_T of the domain."""
    se: Optional[float]
    """Its standard error (None with fewer than two samples)."""
    num_samples: int
    """Samples behind it (the t interval has num_samples - 1 degrees of freedom)."""


def paired_log_ratio(student_losses, teacher_losses, tokens=None) -> LogRatioEstimate:
    """log(ppl_S / ppl_T) of one domain and its standard error, from per-sample mean CE.

    student_losses[i] / teacher_losses[i]: the two models' mean token CE on the same sample i
    (paired: the teacher's noise and the student's on the same text largely cancel in d_i).
    tokens[i]: scored tokens of sample i (None: all equal). With w_i = tokens[i] / sum(tokens),

        log_ratio = sum w_i d_i,    se = sqrt(n / (n - 1) * sum w_i^2 (d_i - log_ratio)^2)

    the sample-weighted (ratio-estimator) standard error; with equal tokens it is exactly
    mean(d) and sd(d, ddof=1) / sqrt(n). Samples with a non-finite loss or no tokens are
    dropped; ValueError when none is left or the arrays differ in length.
    """
    ls = np.asarray(student_losses, dtype=np.float64).ravel()
    lt = np.asarray(teacher_losses, dtype=np.float64).ravel()
    w = np.ones_like(ls) if tokens is None else np.asarray(tokens, dtype=np.float64).ravel()
    if not ls.size == lt.size == w.size:
        raise ValueError(f"paired samples differ in number: student {ls.size}, teacher "
                         f"{lt.size}, tokens {w.size}")
    keep = np.isfinite(ls) & np.isfinite(lt) & np.isfinite(w) & (w > 0)
    d = ls[keep] - lt[keep]
    n = int(d.size)
    if n == 0:
        raise ValueError("paired_log_ratio: no sample with a finite loss and scored tokens")
    w = w[keep] / w[keep].sum()
    mean = float(np.sum(w * d))
    se = None
    if n >= 2:
        se = float(np.sqrt(n / (n - 1) * np.sum(w ** 2 * (d - mean) ** 2)))
    return LogRatioEstimate(log_ratio=mean, se=se, num_samples=n)


def ratio_interval(est: LogRatioEstimate) -> Optional[Tuple[float, float]]:
    """The 95% interval of ppl_S / ppl_T: exp(log_ratio -+ t(0.975, n - 1) * se), or None."""
    if est.se is None:
        return None
    half = t_critical(est.num_samples - 1) * est.se
    lo = min(est.log_ratio - half, MAX_LOG_RATIO)
    hi = min(est.log_ratio + half, MAX_LOG_RATIO)
    return float(np.exp(lo)), float(np.exp(hi))
