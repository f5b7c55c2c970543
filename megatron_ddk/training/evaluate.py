"""Distributed per-domain validation: mean token CE of the student (and the teacher) per domain,
and per validation sample.

Every data-parallel rank takes its share of each domain's validation samples (sample i of a
domain goes to DP rank i % dp_size); the forward passes go through Megatron-Core's schedules
(forward only, TP/PP as in training). Each rank writes its samples' CE sums and token counts into
a zero-initialised [3, domains, max samples] float64 buffer (student sums, tokens, teacher sums;
only the last stage's tp_rank 0 contributes), and one all_reduce SUM over the whole world gives
every rank every sample's values, in manifest sample order — the same per-domain losses on every
rank, which is what makes the DDK controller choose the same weights on every rank. A domain's
mean is its samples' sums summed over its tokens. Memory: 24 bytes x domains x max samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ddk.config.schema import KL_CHUNK_TOKENS
from megatron_ddk.data.mixture import collate
from megatron_ddk.losses.kl import vocab_parallel_cross_entropy
from megatron_ddk.parallel.reduce import reduce_named
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training.schedule import run_batches

logger = logging.getLogger(__name__)


def _rank_entries(valid: Sequence, dp_rank: int, dp_size: int) -> List[Tuple[int, int]]:
    """This DP rank's (domain, sample) pairs: sample i of a domain goes to rank i % dp_size."""
    return [(d, i) for d, ds in enumerate(valid) for i in range(dp_rank, len(ds), dp_size)]


@dataclass
class DomainEval:
    """What evaluate_domains measured; identical on every rank. Losses are mean token CE (nats)."""

    student: np.ndarray
    """[domains] the student's mean CE per domain (float64)."""
    teacher: Optional[np.ndarray]
    """[domains] the teacher's, None unless with_teacher."""
    tokens: np.ndarray
    """[domains] evaluated tokens per domain."""
    student_samples: List[np.ndarray]
    """Per domain, [samples] the student's mean CE of each validation sample, sample order
    (NaN for a sample without a scored token)."""
    teacher_samples: Optional[List[np.ndarray]]
    """Per domain, the teacher's per-sample mean CE (same samples), None unless with_teacher."""
    sample_tokens: List[np.ndarray]
    """Per domain, [samples] scored tokens of each sample (the weights of its mean)."""


def _row_ce(logits, batch, tp_group, vocab_size, chunk_tokens):
    """Per-row [CE sum, token count] of one micro-batch, logits [b, s, v/tp] -> two [b] tensors."""
    ce = vocab_parallel_cross_entropy(logits, batch["labels"], tp_group=tp_group,
                                      vocab_size=vocab_size, chunk_tokens=chunk_tokens)
    mask = batch["loss_mask"] != 0
    ce = torch.where(mask, ce.float(), 0.0)
    return ce.sum(dim=1).cpu().double(), mask.float().sum(dim=1).cpu().double()


def _split_samples(row: torch.Tensor, sizes: Sequence[int]) -> List[np.ndarray]:
    return [row[d, :n].numpy().copy() for d, n in enumerate(sizes)]


def evaluate_domains(model, ctx: ParallelContext, valid: Sequence, *, micro_batch_size: int,
                     seq_length: int, vocab_size: int, with_teacher: bool,
                     chunk_tokens: int = KL_CHUNK_TOKENS) -> DomainEval:
    """Per-domain and per-sample mean validation CE.

    Args:
        model: a DistillationPair stage (its teacher is evaluated too when with_teacher).
        ctx: parallel context.
        valid: per-domain validation datasets (manifest order).
        micro_batch_size / seq_length: evaluation micro-batch shape.
        vocab_size: real vocabulary (padded logits excluded).
        with_teacher: also return the teacher's losses (the pair must hold a teacher).

    Returns:
        A DomainEval (float64 numpy arrays), identical on every rank.
    """
    num_domains = len(valid)
    sizes = [len(ds) for ds in valid]
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
        if masked:  # padding rows score no token, so they add zeros to the sample they repeat
            real = len(entries[i * micro_batch_size:(i + 1) * micro_batch_size])
            batch["loss_mask"][real:] = 0.0
        batches.append(batch)
    # [student CE sum, tokens, teacher CE sum] per (domain, sample)
    stats = torch.zeros(3, num_domains, max(1, max(sizes, default=0)), dtype=torch.float64)

    def loss_of(batch):
        where = (batch["domain_id"], batch["sample_id"])

        def loss_func(output):
            student_logits, teacher_logits = output
            s, c = _row_ce(student_logits, batch, ctx.tp_group, vocab_size, chunk_tokens)
            stats[0].index_put_(where, s, accumulate=True)
            stats[1].index_put_(where, c, accumulate=True)
            if with_teacher:
                t, _ = _row_ce(teacher_logits, batch, ctx.tp_group, vocab_size, chunk_tokens)
                stats[2].index_put_(where, t, accumulate=True)
            zero = torch.zeros((), device=student_logits.device)
            return zero, {}

        return loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        run_batches(ctx, model, batches, loss_of, seq_length, micro_batch_size,
                    forward_only=True)
    model.train(was_training)
    if not (ctx.is_last_stage and ctx.tp_rank == 0):
        stats.zero_()  # only one copy of each DP shard's sums enters the reduction
    return _result(reduce_named({"stats": stats})["stats"], sizes, with_teacher)


def _result(stats: torch.Tensor, sizes: Sequence[int], with_teacher: bool) -> DomainEval:
    """DomainEval of the reduced per-sample buffer; ValueError for a domain without tokens."""
    totals = stats.sum(dim=2)
    tokens = totals[1].numpy()
    if np.any(tokens == 0):
        empty = [i for i, t in enumerate(tokens) if t == 0]
        raise ValueError(f"validation of domain(s) {empty} produced no tokens; check the "
                         f"manifest's valid_prefix datasets")
    per_sample = stats[[0, 2]] / stats[1]  # a sample without a scored token: 0 / 0 = NaN
    return DomainEval(
        student=(totals[0] / totals[1]).numpy(),
        teacher=(totals[2] / totals[1]).numpy() if with_teacher else None,
        tokens=tokens,
        student_samples=_split_samples(per_sample[0], sizes),
        teacher_samples=_split_samples(per_sample[1], sizes) if with_teacher else None,
        sample_tokens=_split_samples(stats[1], sizes))
