"""Distributed per-domain validation: mean token CE of the student (and the teacher) per domain.

Every data-parallel rank takes its share of each domain's validation samples; the forward passes
go through Megatron-Core's schedules (forward only, TP/PP as in training). Sums and token counts
are reduced over the whole world so every rank gets the same per-domain losses — which is what
makes the DDK controller choose the same weights on every rank.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.config.schema import KL_CHUNK_TOKENS
from megatron_ddk.data.mixture import collate
from megatron_ddk.losses.kl import vocab_parallel_cross_entropy
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training.schedule import forward_backward

logger = logging.getLogger(__name__)


def _rank_entries(valid: Sequence, dp_rank: int, dp_size: int) -> List[Tuple[int, int]]:
    """This DP rank's (domain, sample) pairs: sample i of a domain goes to rank i % dp_size."""
    return [(d, i) for d, ds in enumerate(valid) for i in range(dp_rank, len(ds), dp_size)]


def _ce_sums(logits, batch, tp_group, vocab_size, num_domains, chunk_tokens):
    """Per-domain [CE sum, token count] of one micro-batch, logits [b, s, v/tp]."""
    ce = vocab_parallel_cross_entropy(logits, batch["labels"], tp_group=tp_group,
                                      vocab_size=vocab_size, chunk_tokens=chunk_tokens)
    mask = batch["loss_mask"] != 0
    ce = torch.where(mask, ce.float(), 0.0)
    ids = batch["domain_id"]
    sums = torch.zeros(num_domains).index_add_(0, ids, ce.sum(dim=1).cpu())
    counts = torch.zeros(num_domains).index_add_(0, ids, mask.float().sum(dim=1).cpu())
    return sums, counts


def evaluate_domains(model, ctx: ParallelContext, valid: Sequence, *, micro_batch_size: int,
                     seq_length: int, vocab_size: int, with_teacher: bool,
                     chunk_tokens: int = KL_CHUNK_TOKENS) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Per-domain mean validation CE.

    Args:
        model: a DistillationPair stage (its teacher is evaluated too when with_teacher).
        ctx: parallel context.
        valid: per-domain validation datasets (manifest order).
        micro_batch_size / seq_length: evaluation micro-batch shape.
        vocab_size: real vocabulary (padded logits excluded).
        with_teacher: also return the teacher's losses (the pair must hold a teacher).

    Returns:
        (student_losses [N], teacher_losses [N] or None, tokens [N]) as float64 numpy arrays,
        identical on every rank.
    """
    num_domains = len(valid)
    entries = _rank_entries(valid, ctx.dp_rank, ctx.dp_size)
    # every DP rank must run the same number of micro-batches: pad with empty (masked) ones
    per_rank = [len(_rank_entries(valid, r, ctx.dp_size)) for r in range(ctx.dp_size)]
    num_mb = max(1, -(-max(per_rank) // micro_batch_size))
    batches = []
    for i in range(num_mb):
        chunk = entries[i * micro_batch_size:(i + 1) * micro_batch_size]
        masked = len(chunk) < micro_batch_size
        chunk = chunk + [entries[0] if entries else (0, 0)] * (micro_batch_size - len(chunk))
        batch = collate(chunk, valid)
        if masked:
            real = len(entries[i * micro_batch_size:(i + 1) * micro_batch_size])
            batch["loss_mask"][real:] = 0.0
        batches.append(batch)
    stats = torch.zeros(4, num_domains, dtype=torch.float64)
    it = iter(batches)

    def forward_step(_data_iterator, module):
        batch = next(it)
        out = module(batch["tokens"].to(ctx.device), batch["position_ids"].to(ctx.device), None)

        def loss_func(output):
            student_logits, teacher_logits = output
            s, c = _ce_sums(student_logits, batch, ctx.tp_group, vocab_size, num_domains,
                            chunk_tokens)
            stats[0] += s.double()
            stats[1] += c.double()
            if with_teacher:
                t, _ = _ce_sums(teacher_logits, batch, ctx.tp_group, vocab_size, num_domains,
                                chunk_tokens)
                stats[2] += t.double()
            zero = torch.zeros((), device=student_logits.device)
            return zero, {}

        return out, loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        forward_backward(ctx, [model], forward_step, num_mb, seq_length, micro_batch_size,
                         forward_only=True,
                         adjust_tensor_shapes_fn=model.adjust_tensor_shapes if ctx.pp_size > 1 else None)
    model.train(was_training)
    if not (ctx.is_last_stage and ctx.tp_rank == 0):
        stats.zero_()  # only one copy of each DP shard's sums enters the reduction
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    tokens = stats[1].numpy()
    if np.any(tokens == 0):
        empty = [i for i, t in enumerate(tokens) if t == 0]
        raise ValueError(f"validation of domain(s) {empty} produced no tokens; check the "
                         f"manifest's valid_prefix datasets")
    student = (stats[0] / stats[1]).numpy()
    teacher = (stats[2] / stats[1]).numpy() if with_teacher else None
    return student, teacher, tokens
