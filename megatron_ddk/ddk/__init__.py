"""DDK: the math of Eq. 1 / Eq. 2, the ablation policies and the controller that applies them.

Pure numpy: nothing in this package imports torch.distributed or does I/O (docs/ddk.md).
"""

from megatron_ddk.ddk.controller import DDKController
from megatron_ddk.ddk.math import (
    apply_floor_cap,
    apply_repetition_cap,
    bound_weights,
    discrepancy_factor,
    discrepancy_factor_from_losses,
    discrepancy_factor_from_ratio,
    largest_remainder_counts,
    perplexity_ratio,
    smooth_update,
    smooth_update_from_losses,
    smooth_update_from_ratio,
)
from megatron_ddk.ddk.policies import POLICIES, ddk, ddk_no_smoothing, equal, get_policy, static

__all__ = [
    "DDKController",
    "POLICIES",
    "apply_floor_cap",
    "apply_repetition_cap",
    "bound_weights",
    "ddk",
    "ddk_no_smoothing",
    "discrepancy_factor",
    "discrepancy_factor_from_losses",
    "discrepancy_factor_from_ratio",
    "equal",
    "get_policy",
    "largest_remainder_counts",
    "perplexity_ratio",
    "smooth_update",
    "smooth_update_from_losses",
    "smooth_update_from_ratio",
    "static",
]
