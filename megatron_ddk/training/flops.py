"""FLOP accounting: student training and teacher forward FLOPs counted separately.

Per token, a forward pass costs 2 FLOPs per weight of every matrix multiply plus the attention
score and value products (2 * 2 * s * d_head * heads per layer, causal masking not discounted,
as Megatron-LM counts), plus the logits layer (2 * h * V). Training the student costs 3x its
forward (forward + backward of activations and weights); the frozen teacher costs 1x.
MFU = achieved FLOP/s over the device's peak, reported only on GPUs whose peak is known.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ddk.config.optional import have_cuda
from megatron_ddk.config.schema import ModelConfig

# dense bf16 peak FLOP/s per device (NVIDIA data sheets)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def forward_flops_per_token(m: ModelConfig, seq_length: int, padded_vocab: int) -> float:
    """Forward FLOPs per token of one model (matmuls, attention products and logits)."""
    h = m.hidden_size
    heads = m.num_attention_heads
    d = m.kv_channels or h // heads
    groups = m.num_query_groups or heads
    ffn = m.ffn_hidden_size or 4 * h
    qkv = h * d * (heads + 2 * groups)
    proj = heads * d * h
    mlp = h * ffn * (3 if m.activation == "swiglu" else 2)
    attention = 2 * seq_length * d * heads  # QK^T and AV, each s*d per head
    per_layer = 2 * (qkv + proj + mlp) + 2 * attention
    return m.num_layers * per_layer + 2 * h * padded_vocab


def peak_flops() -> Optional[float]:
    """Peak dense bf16 FLOP/s of this process's GPU, or None (CPU, unknown GPU)."""
    if not have_cuda():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


class FlopCounter:
    """FLOPs per optimizer step for the student (3x forward) and the teacher (1x forward)."""

    def __init__(self, student: ModelConfig, teacher: Optional[ModelConfig], seq_length: int,
                 padded_vocab: int, tokens_per_step: int):
        self.student_per_step = (3 * forward_flops_per_token(student, seq_length, padded_vocab)
                                 * tokens_per_step)
        self.teacher_per_step = (forward_flops_per_token(teacher, seq_length, padded_vocab)
                                 * tokens_per_step if teacher is not None else 0.0)
        self.peak = peak_flops()

    def mfu(self, steps: int, seconds: float, world_size: int) -> Optional[float]:
        """Model FLOPs utilisation over `steps` taking `seconds` on `world_size` devices."""
        if self.peak is None or seconds <= 0:
            return None
        return ((self.student_per_step + self.teacher_per_step) * steps / seconds
                / (self.peak * world_size))
