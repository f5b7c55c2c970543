"""The mixture policies of DDK and its ablations (docs/ddk.md; the paper's ablations).

Every policy has the same signature

    policy(prev_r, ratio, alpha, static_weights) -> next r (1-D float64, sums to 1)

where prev_r is the previous interval's factor r_t (Eq. 2's history: r_0 from Eq. 1 at the first
update, then each policy output; never the bounded sampling weights), ratio[i] = ppl_S[i] /
ppl_T[i] measured at the end of the interval (None for policies that do not look at it), alpha the
Eq. 2 smoothing and static_weights the fixed mixture of `static`. The caller (controller.py)
applies the optional floor / cap to r to get the weights the interval samples with:

| name             | rule                                   | paper's name |
| ---------------- | -------------------------------------- | ------------ |
| ddk              | Eq. 2 (smooth update of the history)   | DDK          |
| ddk_no_smoothing | Eq. 1 recomputed at every interval     | DDK w/o FS   |
| equal            | uniform 1 / N                          | DDK ES       |
| static           | fixed weights (natural or given)       | KD / CPT     |

Pure numpy; must not import torch or do I/O.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from megatron_ddk.ddk.math import (
    discrepancy_factor_from_ratio,
    normalize_weights,
    smooth_update_from_ratio,
)

PolicyFn = Callable[[np.ndarray, Optional[np.ndarray], float, Optional[np.ndarray]], np.ndarray]


def _need_ratio(name: str, ratio: Optional[np.ndarray]) -> np.ndarray:
    if ratio is None:
        raise ValueError(f"policy {name!r} needs per-domain student and teacher losses")
    return ratio


def ddk(prev_r: np.ndarray, ratio: Optional[np.ndarray], alpha: float = 0.5,
        static_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Eq. 2: psi = r_t * exp(ratio), renormalised, mixed with the uniform (1 - alpha) / N."""
    return smooth_update_from_ratio(prev_r, _need_ratio("ddk", ratio), alpha)


def ddk_no_smoothing(prev_r: np.ndarray, ratio: Optional[np.ndarray], alpha: float = 0.5,
                     static_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Eq. 1 at every interval: softmax(ratio), no history and no uniform share."""
    return discrepancy_factor_from_ratio(_need_ratio("ddk_no_smoothing", ratio))


def equal(prev_r: np.ndarray, ratio: Optional[np.ndarray] = None, alpha: float = 0.5,
          static_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Uniform sampling over the domains (DDK ES)."""
    n = np.asarray(prev_r).size
    return np.full(n, 1.0 / n)


def static(prev_r: np.ndarray, ratio: Optional[np.ndarray] = None, alpha: float = 0.5,
           static_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """The fixed mixture `static_weights` (the KD and CPT baselines)."""
    if static_weights is None:
        raise ValueError("policy 'static' needs static_weights (ddk.static_weights, or the "
                         "natural token shares)")
    w = normalize_weights(static_weights, "static_weights")
    if w.size != np.asarray(prev_r).size:
        raise ValueError(f"static_weights has {w.size} entries for "
                         f"{np.asarray(prev_r).size} domains")
    return w


POLICIES: Dict[str, PolicyFn] = {
    "ddk": ddk,
    "ddk_no_smoothing": ddk_no_smoothing,
    "equal": equal,
    "static": static,
}
"""Policy name (DDKConfig.policy) -> function."""

ADAPTIVE_POLICIES = frozenset({"ddk", "ddk_no_smoothing"})
"""Policies whose weights depend on the student / teacher losses."""


def get_policy(name: str) -> PolicyFn:
    """The policy function for `name`; ValueError listing the choices otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"ddk.policy={name!r}: unknown policy; choose one of "
                         f"{sorted(POLICIES)}") from None
