"""Distillation losses: vocab-parallel KL / CE (kl.py), Eq. 3 for Megatron schedules (distill.py).
The top-K KL of an offline teacher is topk_kl.py; both kernels share vocab_shard.py (shard plan,
chunk loop, shard statistics).

Imports torch only; never megatron_ddk.models, .data, .ddk or .training.
"""

from megatron_ddk.losses.distill import DistillationLoss, distillation_loss_from_config
from megatron_ddk.losses.kl import (
                                    vocab_parallel_ce_and_kl,
                                    vocab_parallel_cross_entropy,
                                    vocab_parallel_kl,
)

__all__ = [
    "DistillationLoss", "distillation_loss_from_config", "vocab_parallel_ce_and_kl",
    "vocab_parallel_cross_entropy", "vocab_parallel_kl",
]
