"""Tail samples: the teacher's mass outside its top-K, represented by M sampled token ids.

A top-K store keeps the teacher's K most likely tokens exactly and lumps everything else into one
rest bucket of mass R. The loss then pushes the student's total mass outside the K ids towards R
but leaves the *shape* of the student's tail to the student: for a flat teacher, whose top K
carry only part of the distribution, that is a biased target (the top-K KD student trails the
online one). Tail sampling keeps the K entries and replaces the bucket by M ids drawn from the
teacher's tail distribution p_v / R (v outside the K ids), each drawn id standing for mass R / M.
The stored distribution w (head exact, tail c_v R / M with c_v the draws of v) satisfies
E[w] = p over the draws, and the KL's gradient with respect to the student logits is linear in the
teacher's distribution, (1/T)(q - w): **an unbiased estimate of the dense KL's gradient**.

The draws are systematic (one uniform u per token): targets y_j = (j + u) / M x R, j = 0..M-1,
each mapped to the token whose cumulative tail mass (in id order) first exceeds it. Every tail
token then gets floor(M p_v / R) or ceil(M p_v / R) draws (never fewer, never more), with
E[c_v] = M p_v / R exactly over u ~ U[0, 1): the lowest-variance unbiased choice of M ids. The
ids come out in ascending order (the targets and the cumulative mass both increase).

Shards and collectives: the logits stay sharded over tensor-parallel ranks (vocab_shard.py's
plan). One all_reduce(MAX) for the global max, one all_gather of each shard's tail mass (so every
rank knows where its columns sit on the global cumulative axis), a local cumulative sum and
searchsorted, and one all_reduce(MAX) of the drawn ids (each target belongs to exactly one rank's
interval; the others contribute -1). The vocabulary is never gathered. float64 throughout the
cumulative sums, so a layout changes a draw only when a target falls within ~1e-16 of a boundary.

Used by the store's producer (training/teacher_cache.py). Must not import: megatron_ddk.models,
.data, .ddk, .training (pure torch here).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_ddk.config.schema import KL_CHUNK_TOKENS
from megatron_ddk.losses import vocab_shard as vs

CALLER = "vocab_parallel_tail_sample"


def _tail_weights(p: vs.ShardPlan, z: torch.Tensor, col, inside, shift) -> torch.Tensor:
    """exp(z / T - shift) in float64 on this shard's valid columns, 0 at the head ids."""
    x = torch.exp(z.double() * p.inv_t - shift.double().unsqueeze(-1))
    head = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    head.scatter_add_(1, col, inside.int())  # counts, not booleans: clamped columns may repeat
    return x.masked_fill_(head > 0, 0.0)


def _shard_mass(p: vs.ShardPlan, local: torch.Tensor) -> torch.Tensor:
    """[world, n] every rank's tail mass (rank order)."""
    if p.world_size == 1:
        return local.unsqueeze(0)
    parts = [torch.empty_like(local) for _ in range(p.world_size)]
    dist.all_gather(parts, local.contiguous(), group=p.group)
    return torch.stack(parts)


def _draw(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor,
          start: int) -> torch.Tensor:
    """[n, M] global ids of the targets y (on the global cumulative axis) that fall in this
    shard's interval [lo, hi) of it, -1 elsewhere."""
    mine = (y >= lo.unsqueeze(-1)) & (y < hi.unsqueeze(-1))
    cum = torch.cumsum(x, dim=1)
    idx = torch.searchsorted(cum, (y - lo.unsqueeze(-1)).contiguous(), right=True)
    # rounding can put a target past the shard's last positive column: take that column
    positive = x > 0
    last = x.shape[1] - 1 - positive.flip(1).int().argmax(dim=1)
    idx = torch.minimum(idx, last.unsqueeze(-1))
    return torch.where(mine, idx + start, -1)


def vocab_parallel_tail_sample(logits: torch.Tensor, head_ids: torch.Tensor,
                               uniforms: torch.Tensor, num_samples: int, *, tp_group,
                               temperature: float = 1.0, vocab_size: Optional[int] = None,
                               chunk_tokens: int = KL_CHUNK_TOKENS) -> torch.Tensor:
    """M systematic draws per token from softmax(logits / T) outside `head_ids` (docstring).

    Args:
        logits: [.., v/tp] this rank's vocabulary shard of the teacher's logits.
        head_ids: [.., K] global ids excluded from the draws (the stored top-K; -1: none).
        uniforms: [..] one u in [0, 1) per token (the draw's only randomness: the caller seeds
            it, so a store is reproducible whatever the layout).
        num_samples: M >= 1.
        tp_group: the tensor-parallel group (a world-1 group without TP).

    Returns:
        [.., M] int64 global ids in ascending order (repeats allowed), the same on every rank
        of tp_group; all -1 for a token whose tail has no mass (K covers the vocabulary).
    """
    m = int(num_samples)
    if m < 1:
        raise ValueError(f"{vs.ERROR_PREFIX}.{CALLER}: num_samples={num_samples} must be >= 1")
    lead, local = tuple(logits.shape[:-1]), logits.shape[-1]
    if tuple(head_ids.shape[:-1]) != lead or tuple(uniforms.shape) != lead:
        raise ValueError(f"{vs.ERROR_PREFIX}.{CALLER}: head_ids {tuple(head_ids.shape)} and "
                         f"uniforms {tuple(uniforms.shape)} must be shaped like the logits "
                         f"{tuple(logits.shape)} without (uniforms) or with K in (head_ids) "
                         f"the last dim")
    plan = vs.make_plan(logits, tp_group, vocab_size, want_kl=False, want_ce=False,
                        reverse=False, temperature=temperature, chunk_tokens=chunk_tokens,
                        caller=CALLER)
    z = logits.detach().reshape(-1, local)
    n, nv, dev = z.shape[0], plan.num_valid, z.device
    heads = head_ids.reshape(n, -1).long()
    u = uniforms.reshape(n).double().to(dev)
    local_max = torch.full((n,), float("-inf"), device=dev)
    if nv > 0:
        local_max = z[:, :nv].float().mul(plan.inv_t).amax(dim=-1)
    shift, _ = vs.global_max(plan, local_max)
    col, inside = vs.local_columns(plan, heads)
    out = torch.full((n, m), -1, dtype=torch.int64, device=dev)
    frac = torch.arange(m, dtype=torch.float64, device=dev)
    r = dist.get_rank(group=plan.group) if plan.world_size > 1 else 0
    for rows in vs.chunk_rows(n, plan.chunk):
        if nv > 0:
            x = _tail_weights(plan, z[rows, :nv], col[rows], inside[rows], shift[rows])
        else:
            x = torch.zeros(rows.stop - rows.start, 0, dtype=torch.float64, device=dev)
        mass = _shard_mass(plan, x.sum(dim=1))  # [world, rows]
        # shard bounds on the global axis: rank r owns [bounds[r], bounds[r + 1]), the same
        # float64 values on every rank, so each target has exactly one owner
        bounds = torch.cat([torch.zeros_like(mass[:1]), torch.cumsum(mass, dim=0)])
        lo, hi, total = bounds[r], bounds[r + 1], bounds[-1]
        y = (frac.unsqueeze(0) + u[rows].unsqueeze(-1)) / m * total.unsqueeze(-1)
        y = torch.minimum(y, torch.nextafter(total, torch.zeros_like(total)).unsqueeze(-1))
        ids = _draw(x, lo, hi, y, plan.start) if nv > 0 else torch.full_like(y, -1).long()
        out[rows] = torch.where(total.unsqueeze(-1) > 0, ids, -1)
    if plan.world_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=plan.group)
    return out.view(*lead, m)

