"""The frozen teacher: built on the student's parallel context, loaded, never trained.

Frozen means: requires_grad False on every parameter, eval mode (no dropout), forward under
torch.no_grad, never wrapped in DDP, never handed to the optimizer, never saved with the student.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from megatron_ddk.config.loader import to_dict
from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.models.build import build_gpt_model
from megatron_ddk.models.checkpoint import (
    META_FILE,
    ResolvedCheckpoint,
    check_compatible,
    describe_checkpoint,
    load_model,
)
from megatron_ddk.models.fp8 import recast_fp8_weights_every_forward
from megatron_ddk.parallel.state import ParallelContext

logger = logging.getLogger(__name__)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients and dropout for good."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def load_checkpoint_model(model_cfg: ModelConfig, ctx: ParallelContext, padded_vocab_size: int,
                          folder: Union[str, ResolvedCheckpoint], *,
                          bf16: bool = False) -> torch.nn.Module:
    """This rank's stage of `model_cfg` with the weights of checkpoint `folder` (a path or the
    run's ResolvedCheckpoint; any saved TP/PP). With bf16 the whole module is cast as
    Float16Module does in training (torch's norms are built fp32). The one way the package
    builds a model from a checkpoint."""
    model = build_gpt_model(model_cfg, ctx, padded_vocab_size, bf16=bf16)
    load_model(folder, model)
    if bf16:
        model.bfloat16()
    return model


def build_teacher(teacher: ModelConfig, ctx: ParallelContext, padded_vocab_size: int,
                  load: Union[str, ResolvedCheckpoint], *, bf16: bool = False,
                  tokenizer_hash: Optional[str] = None):
    """Build the teacher's stage, load its checkpoint (any saved TP/PP), freeze it.

    `load` is a megatron-ddk or Megatron-LM checkpoint (root, iter_NNNNNNN or release folder), or
    the run's ResolvedCheckpoint of it (not read again); a Megatron-LM checkpoint records no
    model, so `teacher` (the config's) is the architecture and its padded vocabulary must match
    the checkpoint's embedding rows."""
    ckpt = describe_checkpoint(load)
    folder, meta = ckpt.folder, ckpt.metadata
    check_compatible(meta, to_dict(teacher), padded_vocab_size, tokenizer_hash,
                     f"{ckpt.path} (distill.teacher_load)")
    if not meta:
        logger.info("teacher %s has no %s (a Megatron-LM checkpoint): built from distill.teacher "
                    "with %d embedding rows", folder, META_FILE, padded_vocab_size)
    model = load_checkpoint_model(teacher, ctx, padded_vocab_size, ckpt, bf16=bf16)
    logger.info("teacher loaded from %s (%d parameters on this rank)", folder,
                sum(p.numel() for p in model.parameters()))
    recast_fp8_weights_every_forward(model)  # no-op without FP8; see models/fp8.py
    return freeze(model)
