"""Vocab-parallel KL divergence and cross entropy over tensor-parallel vocabulary shards.

Owns the per-token math of Eq. 3 (docs/losses.md) on logits sharded over the vocabulary the way
Megatron-Core's output layer shards them: rank r of the tensor-parallel group holds the contiguous
columns [r * v/tp, (r + 1) * v/tp) of the (padded) vocabulary, logits shaped [s, b, v/tp].

    vocab_parallel_kl(student, teacher, tp_group=g)            -> KL per token  [s, b] fp32
    vocab_parallel_cross_entropy(logits, labels, tp_group=g)   -> CE per token  [s, b] fp32
    vocab_parallel_ce_and_kl(student, teacher, labels, ...)    -> (CE, KL), reductions shared

How it stays lean: the full vocabulary is never gathered. Each rank reduces its shard to a few
numbers per token (local max, local sum-exp, a local weighted sum), then one all_reduce(MAX) and
one all_reduce(SUM) over `tp_group` finish every statistic at once. The autograd Function saves
only its inputs (held by the model anyway) and per-token statistics; the backward recomputes the
softmaxes `chunk_tokens` tokens at a time, so the memory beyond the student gradient is two fp32
buffers of chunk_tokens x v/tp. Logits may be bf16: every chunk is computed in fp32.
The shard plan, chunk loop and shard statistics are vocab_shard.py's (shared with topk_kl.py).

Must not import: megatron_ddk.models, .data, .ddk, .training, nor of config more than the
schema's KL_CHUNK_TOKENS default (pure torch here).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_ddk.config.schema import KL_CHUNK_TOKENS
from megatron_ddk.losses.vocab_shard import (
    ERROR_PREFIX,
    ShardPlan,
    all_reduce_sum,
    check_labels,
    chunk_rows,
    global_max,
    local_columns,
    local_stats,
    make_plan,
    per_token_outputs,
    shifted,
    student_grad,
    target_logits,
)


def _forward_chunk(p: ShardPlan, zs, zt, a_buf, b_buf, stats: dict, rows: slice) -> None:
    """Local statistics of one chunk of tokens (valid columns only), written into `stats`."""
    if p.want_kl:
        # The distribution that weights the log-ratio is the teacher (forward) or the student
        # (reverse); its exp() is computed last so it is still in a_buf for the weighted sum.
        first, second, key1, key2 = (zs, zt, "s", "t") if not p.reverse else (zt, zs, "t", "s")
        stats["m_" + key1][rows], stats["s_" + key1][rows] = local_stats(a_buf, first, p.inv_t)
        stats["m_" + key2][rows], stats["s_" + key2][rows] = local_stats(a_buf, second, p.inv_t)
        if second.dtype == torch.float32:
            diff = torch.sub(second, first, out=b_buf)
        else:  # in-place on the fp32 buffer: the subtraction itself runs in fp32
            diff = b_buf.copy_(second).sub_(first)
        if p.inv_t != 1.0:
            diff.mul_(p.inv_t)  # (y - x) forward, (x - y) reverse
        stats["a"][rows] = a_buf.mul_(diff).sum(dim=-1)
    if p.want_ce and not p.share:
        stats["m_1"][rows], stats["s_1"][rows] = local_stats(a_buf, zs, 1.0)


def _reduce_stats(p: ShardPlan, stats: dict, target: Optional[torch.Tensor]) -> dict:
    """Finish the per-token statistics over the group: one all_reduce(MAX), one all_reduce(SUM)."""
    keys = [k for k in ("s", "t", "1") if "m_" + k in stats]
    maxes, scale = global_max(p, torch.stack([stats["m_" + k] for k in keys]))
    rows = [stats["s_" + k] * scale[i] for i, k in enumerate(keys)]
    if p.want_kl:
        rows.append(stats["a"] * scale[keys.index("s" if p.reverse else "t")])
    if target is not None:
        rows.append(target)
    sums = all_reduce_sum(p, torch.stack(rows))
    out = {"lse_" + k: maxes[i] + torch.log(sums[i]) for i, k in enumerate(keys)}
    if p.want_kl:
        weight_sum = sums[len(keys)] / sums[keys.index("s" if p.reverse else "t")]
        sign = -1.0 if p.reverse else 1.0
        out["kl"] = weight_sum + sign * (out["lse_s"] - out["lse_t"])
    if target is not None:
        out["target"] = sums[-1]
    return out


def _empty_stats(p: ShardPlan, n: int, device) -> dict:
    """Per-token local statistics, initialised for a shard without valid columns."""
    keys = (["s", "t"] if p.want_kl else []) + (["1"] if p.want_ce and not p.share else [])
    stats = {}
    for k in keys:
        stats["m_" + k] = torch.full((n,), float("-inf"), device=device)
        stats["s_" + k] = torch.zeros(n, device=device)
    if p.want_kl:
        stats["a"] = torch.zeros(n, device=device)
    return stats


def _forward(p: ShardPlan, student2d, teacher2d, labels1d):
    """Per-token (ce, kl) in fp32 plus the statistics the backward needs."""
    n, dev = student2d.shape[0], student2d.device
    stats = _empty_stats(p, n, dev)
    nv = p.num_valid
    if nv > 0:
        a_buf = torch.empty(min(p.chunk, n), nv, dtype=torch.float32, device=dev)
        b_buf = torch.empty_like(a_buf) if p.want_kl else None
        for rows in chunk_rows(n, p.chunk):
            k = rows.stop - rows.start
            zt = teacher2d[rows, :nv] if p.want_kl else None
            _forward_chunk(p, student2d[rows, :nv], zt, a_buf[:k],
                           None if b_buf is None else b_buf[:k], stats, rows)
        del a_buf, b_buf
    target = target_logits(p, student2d, labels1d) if p.want_ce else None
    red = _reduce_stats(p, stats, target)
    if p.share:
        red["lse_1"] = red["lse_s"]
    ce = kl = None
    if p.want_ce:
        in_vocab = (labels1d >= 0) & (labels1d < p.vocab_size)
        ce = torch.where(in_vocab, red["lse_1"] - red["target"], float("nan"))
    if p.want_kl:
        kl = red["kl"]
    return ce, kl, red


def _backward_chunk(p: ShardPlan, zs, zt, labels, red: dict, g_ce, g_kl, out, a_buf, b_buf, rows):
    """Write d(sum_t g_ce*ce + g_kl*kl)/d student into `out` for one chunk (valid columns)."""
    a = out if a_buf is None else a_buf
    if p.want_kl:
        gk = (g_kl[rows] * p.inv_t).unsqueeze(-1)
        log_ps = shifted(a, zs, red["lse_s"][rows].unsqueeze(-1), p.inv_t)
        log_pt = shifted(b_buf, zt, red["lse_t"][rows].unsqueeze(-1), p.inv_t)
        if p.reverse:  # d/dx = p_S * (log p_S - log p_T - KL)
            w = log_pt.neg_().add_(log_ps).sub_(red["kl"][rows].unsqueeze(-1)).mul_(gk)
            if p.share:
                w.add_(g_ce[rows].unsqueeze(-1))
            a = log_ps.exp_().mul_(w)
        else:  # d/dx = p_S - p_T
            ps, pt = log_ps.exp_(), log_pt.exp_()
            ps.mul_(gk + g_ce[rows].unsqueeze(-1) if p.share else gk)
            a = ps.sub_(pt.mul_(gk))
        if p.want_ce and not p.share:
            p1 = shifted(b_buf, zs, red["lse_1"][rows].unsqueeze(-1), 1.0).exp_()
            a.add_(p1.mul_(g_ce[rows].unsqueeze(-1)))
    else:
        a = shifted(a, zs, red["lse_1"][rows].unsqueeze(-1), 1.0).exp_()
        a.mul_(g_ce[rows].unsqueeze(-1))
    if p.want_ce:  # the one-hot term of CE: -g_ce at the label column, where it is ours
        col, inside = local_columns(p, labels[rows])  # a mask, no host sync
        a.scatter_add_(1, col.unsqueeze(1), torch.where(inside, -g_ce[rows], 0.0).unsqueeze(1))
    if a is not out:
        out.copy_(a)


class _VocabParallelLoss(torch.autograd.Function):
    """(ce, kl) per token from vocabulary-sharded logits; gradient w.r.t. the student only."""

    @staticmethod
    def forward(ctx, student, teacher, labels, plan: ShardPlan):
        local = student.shape[-1]
        student2d = student.reshape(-1, local)
        teacher2d = teacher.reshape(-1, local) if plan.want_kl else None
        labels1d = labels.reshape(-1) if plan.want_ce else None
        ce, kl, red = _forward(plan, student2d, teacher2d, labels1d)
        ctx.plan = plan
        keep = {k: red[k] for k in ("lse_s", "lse_t", "lse_1") if k in red}
        if plan.want_kl and plan.reverse:  # a copy: the returned kl may be edited in place
            keep["kl"] = red["kl"].clone()
        ctx.keys = tuple(keep)
        ctx.save_for_backward(student, teacher, labels, *keep.values())
        return per_token_outputs(student, ce, kl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, grad_kl):
        p: ShardPlan = ctx.plan
        student, teacher, labels, *saved = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        red = dict(zip(ctx.keys, saved))
        local = student.shape[-1]
        zs = student.reshape(-1, local)
        n = zs.shape[0]
        g_ce = grad_ce.reshape(-1).float() if p.want_ce else None
        g_kl = grad_kl.reshape(-1).float() if p.want_kl else None
        zt = teacher.reshape(-1, local) if p.want_kl else None
        lab = labels.reshape(-1) if p.want_ce else None
        # In fp32 the gradient slice itself is the first working buffer (a_buf None).
        grad, a_buf = student_grad(p, zs)
        nv = p.num_valid
        if nv > 0:
            k = min(p.chunk, n)
            b_buf = zs.new_empty(k, nv, dtype=torch.float32) if p.want_kl else None
            for rows in chunk_rows(n, p.chunk):
                m = rows.stop - rows.start
                _backward_chunk(p, zs[rows, :nv], None if zt is None else zt[rows, :nv], lab,
                                red, g_ce, g_kl, grad[rows, :nv],
                                None if a_buf is None else a_buf[:m],
                                None if b_buf is None else b_buf[:m], rows)
        return grad.view(student.shape), None, None, None


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, caller: str) -> torch.Tensor:
    if teacher.shape != student.shape:
        raise ValueError(f"{ERROR_PREFIX}.{caller}: teacher logits {tuple(teacher.shape)} and "
                         f"student logits {tuple(student.shape)} must have the same shape "
                         "[s, b, v/tp]")
    return teacher.detach()  # the teacher is frozen: no gradient ever flows into it


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tp_group,
                      temperature: float = 1.0, reverse: bool = False,
                      vocab_size: Optional[int] = None,
                      chunk_tokens: int = KL_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token KL between softmax(z / T) of teacher and student, vocabulary sharded over TP.

    Args:
        student_logits: [s, b, v/tp] (any leading shape works), this rank's contiguous vocabulary
            shard; fp32 or bf16. Receives the gradient.
        teacher_logits: same shape; detached (the teacher never gets a gradient).
        tp_group: the tensor-parallel process group the vocabulary is sharded over (required;
            a world-1 group without tensor parallelism).
        temperature: T of both softmaxes. The result is NOT multiplied by T^2.
        reverse: False = KL(p_T || p_S) (forward, "KD"); True = KL(p_S || p_T) (reverse).
        vocab_size: the real vocabulary; global columns >= vocab_size (padding) are excluded
            from both distributions and get an exactly zero gradient. None = no padding.
        chunk_tokens: tokens per fp32 working chunk (memory: 2 x chunk_tokens x v/tp x 4 bytes).

    Returns:
        KL per token, fp32, shaped like the logits without their last dim ([s, b]).
    """
    teacher = _check_pair(student_logits, teacher_logits, "vocab_parallel_kl")
    plan = make_plan(student_logits, tp_group, vocab_size, want_kl=True, want_ce=False,
                      reverse=reverse, temperature=temperature, chunk_tokens=chunk_tokens,
                      caller="vocab_parallel_kl")
    return _VocabParallelLoss.apply(student_logits, teacher, None, plan)[1]


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, tp_group,
                                 vocab_size: Optional[int] = None,
                                 chunk_tokens: int = KL_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token cross entropy of vocabulary-sharded logits against global label ids.

    Args:
        logits: [s, b, v/tp] (any leading shape), this rank's vocabulary shard, fp32 or bf16.
        labels: global token ids shaped like logits without the last dim ([s, b]). A label
            outside [0, vocab_size) gives NaN (mask such positions with torch.where, not *).
        tp_group: the tensor-parallel process group (required; a world-1 group without TP).
        vocab_size: the real vocabulary; padded columns are excluded from the softmax.
        chunk_tokens: tokens per fp32 working chunk.

    Returns:
        CE per token, fp32, shaped like labels.
    """
    check_labels(logits, labels, "vocab_parallel_cross_entropy")
    plan = make_plan(logits, tp_group, vocab_size, want_kl=False, want_ce=True, reverse=False,
                      temperature=1.0, chunk_tokens=chunk_tokens,
                      caller="vocab_parallel_cross_entropy")
    return _VocabParallelLoss.apply(logits, None, labels, plan)[0]


def vocab_parallel_ce_and_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             labels: torch.Tensor, *, tp_group, temperature: float = 1.0,
                             reverse: bool = False, vocab_size: Optional[int] = None,
                             chunk_tokens: int = KL_CHUNK_TOKENS
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(CE, KL) per token in one pass; see vocab_parallel_kl and vocab_parallel_cross_entropy.

    The CE is at temperature 1 on the raw student logits; at T == 1 it shares the student's
    softmax statistics with the KL, otherwise it adds one more statistic to the same two
    all_reduces. One backward pass produces the gradient of any combination of the two.
    """
    teacher = _check_pair(student_logits, teacher_logits, "vocab_parallel_ce_and_kl")
    check_labels(student_logits, labels, "vocab_parallel_ce_and_kl")
    plan = make_plan(student_logits, tp_group, vocab_size, want_kl=True, want_ce=True,
                      reverse=reverse, temperature=temperature, chunk_tokens=chunk_tokens,
                      caller="vocab_parallel_ce_and_kl")
    ce, kl = _VocabParallelLoss.apply(student_logits, teacher, labels, plan)
    return ce, kl
