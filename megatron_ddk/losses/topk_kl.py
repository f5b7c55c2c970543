"""Top-K KL: the forward KL against a teacher known only by its top-K log-probabilities.

The offline teacher (data/teacher_store.py) keeps, per token, the teacher's K most likely token
ids, their log-probabilities at temperature T, and the log of the mass it puts on every other
token (the "rest"). The KL is exact over the K tokens plus one bucket for the rest:

    KL = sum_k p_k (log p_k - log q_k)  +  R_T (log R_T - log R_S)

p_k / q_k: teacher / student probability of top-K token k (softmax(z / T)); R_T = teacher mass
outside the K tokens (stored), R_S = student mass outside them. It equals the dense KL when K
covers the vocabulary (R_T = 0) and is the KL between the two distributions coarsened to K + 1
outcomes otherwise (a lower bound of the dense KL, by the data-processing inequality). A token
may hold fewer than K entries (a format-2 store's adaptive coverage, data/store_codec.py): the
unused slots carry id -1 and log-probability -inf, fall in no rank's shard and add exactly zero
to the value and the gradient, so the KL is exact over that token's own entries plus its rest.

Shards and collectives: the student's logits stay sharded over tensor-parallel ranks exactly as
in kl.py ([.., v/tp], contiguous vocabulary columns, padding at the end). Each rank computes its
shard's max and sum-exp (all columns and the columns outside the top-K, the latter without
cancellation: the top-K entries are subtracted from themselves, giving exact zeros), and gathers
the student logits of the top-K ids that fall in its shard; one all_reduce(MAX) and one
all_reduce(SUM) (per-token statistics plus an [n, K] tensor) finish everything. The vocabulary is
never gathered. The backward recomputes softmax(z / T) chunk by chunk (kl.py's memory bound);
saved: the inputs plus [n, K] and per-token fp32 tensors.

Also here: vocab_parallel_topk, the teacher-side top-K of vocabulary-sharded logits (local top-K,
an all_gather of K candidates per rank, global top-K), used by the store's producer.

The shard plan, chunk loop and shard statistics are vocab_shard.py's (`vs.`; shared with kl.py).
Must not import: megatron_ddk.models, .data, .ddk, .training, nor of config more than the
schema's KL_CHUNK_TOKENS default (pure torch here).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ddk.config.schema import KL_CHUNK_TOKENS
from megatron_ddk.losses import vocab_shard as vs


def _forward_chunk(p: vs.ShardPlan, zs, col, inside, buf, st: dict, rows: slice) -> None:
    """Local max, sum-exp of all columns and of the columns outside the top-K (at 1/T), and the
    CE statistics when they cannot be shared; valid columns only."""
    st["m_s"][rows], st["s_s"][rows] = vs.local_stats(buf, zs, p.inv_t)
    x = buf  # exp(z / T - max); exact zeros at the top-K columns of this shard (x - x) below
    x.scatter_add_(1, col, torch.where(inside, -x.gather(1, col), 0.0))
    st["r_s"][rows] = x.sum(dim=-1)
    if p.want_ce and not p.share:
        st["m_1"][rows], st["s_1"][rows] = vs.local_stats(buf, zs, 1.0)


def _forward(p: vs.ShardPlan, z2d, ids, t_logp, t_rest, labels):
    """Per-token (ce or None, kl) and what the backward needs."""
    n, k, dev = z2d.shape[0], ids.shape[1], z2d.device
    col, inside = vs.local_columns(p, ids)
    st = {key: torch.full((n,), float("-inf"), device=dev) for key in ("m_s", "m_1")}
    st.update({key: torch.zeros(n, device=dev) for key in ("s_s", "r_s", "s_1")})
    nv = p.num_valid
    if nv > 0:
        buf = torch.empty(min(p.chunk, n), nv, dtype=torch.float32, device=dev)
        for rows in vs.chunk_rows(n, p.chunk):
            _forward_chunk(p, z2d[rows, :nv], col[rows], inside[rows],
                           buf[:rows.stop - rows.start], st, rows)
        del buf
        z_k = torch.where(inside, z2d.gather(1, col).float(), 0.0)
    else:
        z_k = torch.zeros(n, k, device=dev)
    keys = ["s"] + (["1"] if p.want_ce and not p.share else [])
    maxes, scale = vs.global_max(p, torch.stack([st["m_" + key] for key in keys]))
    rows = [st["s_s"] * scale[0], st["r_s"] * scale[0]]
    if "1" in keys:
        rows.append(st["s_1"] * scale[1])
    if p.want_ce:
        rows.append(vs.target_logits(p, z2d, labels))
    sums = vs.all_reduce_sum(p, torch.cat([torch.stack(rows).reshape(-1), z_k.reshape(-1)]))
    per_token = sums[:len(rows) * n].view(len(rows), n)
    z_k = sums[len(rows) * n:].view(n, k)
    lse_s = maxes[0] + torch.log(per_token[0])
    log_rest_s = maxes[0] + torch.log(per_token[1]) - lse_s  # -inf when K covers the vocabulary
    log_q = z_k * p.inv_t - lse_s.unsqueeze(-1)
    p_k = t_logp.exp()
    has_rest = t_rest > float("-inf")
    rest_term = torch.where(has_rest, t_rest.exp() * (t_rest - log_rest_s), 0.0)
    kl = torch.where(p_k > 0, p_k * (t_logp - log_q), 0.0).sum(dim=-1) + rest_term
    ce = lse_1 = None
    if p.want_ce:
        lse_1 = lse_s if p.share else maxes[1] + torch.log(per_token[2])
        in_vocab = (labels >= 0) & (labels < p.vocab_size)
        ce = torch.where(in_vocab, lse_1 - per_token[-1], float("nan"))
    saved = dict(lse_s=lse_s, log_rest_s=log_rest_s, log_q=log_q)
    if lse_1 is not None and not p.share:
        saved["lse_1"] = lse_1
    return ce, kl, saved


def _backward_chunk(p: vs.ShardPlan, zs, col, inside, sv: dict, g_ce, g_kl, out, buf, rows) -> None:
    """d(sum g_ce * ce + g_kl * kl) / d student for one chunk of tokens (valid columns).

    dKL/dz_j = (1/T) [P q_j - p_j] on the top-K, (1/T) q_j [P - R_T / R_S] elsewhere, with
    P = sum_k p_k + R_T (1 up to the stored values' rounding).
    """
    a = out if buf is None else buf
    g = g_kl[rows] * p.inv_t
    p_k = sv["t_logp"][rows].exp()
    t_rest = sv["t_rest"][rows]
    has_rest = t_rest > float("-inf")
    ratio = torch.where(has_rest, torch.exp(t_rest - sv["log_rest_s"][rows]), 0.0)  # R_T / R_S
    total = p_k.sum(dim=-1) + torch.where(has_rest, t_rest.exp(), 0.0)
    coef = g * (total - ratio)
    if p.share:
        coef = coef + g_ce[rows]
    q = vs.shifted(a, zs, sv["lse_s"][rows].unsqueeze(-1), p.inv_t).exp_()
    q.mul_(coef.unsqueeze(-1))
    # on the top-K columns: g (q_k R_T / R_S - p_k) on top of the coef * q_k written above
    corr = g.unsqueeze(-1) * (sv["log_q"][rows].exp() * ratio.unsqueeze(-1) - p_k)
    q.scatter_add_(1, col[rows], torch.where(inside[rows], corr, 0.0))
    if p.want_ce and not p.share:
        if buf is None:  # fp32 gradient written in place: a temporary for the T = 1 softmax
            p1 = vs.shifted(torch.empty_like(q), zs, sv["lse_1"][rows].unsqueeze(-1), 1.0).exp_()
        else:
            p1 = torch.sub(zs.float(), sv["lse_1"][rows].unsqueeze(-1)).exp_()
        q.add_(p1.mul_(g_ce[rows].unsqueeze(-1)))
    if p.want_ce:  # the one-hot term of CE, where the label is ours
        lab_col, lab_in = vs.local_columns(p, sv["labels"][rows])
        q.scatter_add_(1, lab_col.unsqueeze(1), torch.where(lab_in, -g_ce[rows], 0.0).unsqueeze(1))
    if q is not out:
        out.copy_(q)


class _TopKLoss(torch.autograd.Function):
    """(ce, kl) per token; gradient with respect to the student logits only."""

    @staticmethod
    def forward(ctx, student, ids, t_logp, t_rest, labels, plan: vs.ShardPlan):
        local, k = student.shape[-1], ids.shape[-1]
        z2d = student.reshape(-1, local)
        ids2d, logp2d = ids.reshape(-1, k).long(), t_logp.reshape(-1, k).float()
        rest1d = t_rest.reshape(-1).float()
        lab1d = labels.reshape(-1) if plan.want_ce else None
        ce, kl, saved = _forward(plan, z2d, ids2d, logp2d, rest1d, lab1d)
        saved.update(t_logp=logp2d, t_rest=rest1d, ids=ids2d)
        if lab1d is not None:
            saved["labels"] = lab1d
        ctx.plan, ctx.keys = plan, tuple(saved)
        ctx.save_for_backward(student, *saved.values())
        return vs.per_token_outputs(student, ce, kl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, grad_kl):
        p: vs.ShardPlan = ctx.plan
        student, *rest = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        sv = dict(zip(ctx.keys, rest))
        local = student.shape[-1]
        zs = student.reshape(-1, local)
        n = zs.shape[0]
        g_ce = grad_ce.reshape(-1).float() if p.want_ce else None
        g_kl = grad_kl.reshape(-1).float()
        col, inside = vs.local_columns(p, sv["ids"])
        grad, buf = vs.student_grad(p, zs)  # buf None: the fp32 gradient is the working buffer
        nv = p.num_valid
        if nv > 0:
            for rows in vs.chunk_rows(n, p.chunk):
                _backward_chunk(p, zs[rows, :nv], col, inside, sv, g_ce, g_kl, grad[rows, :nv],
                                None if buf is None else buf[:rows.stop - rows.start], rows)
        return grad.view(student.shape), None, None, None, None, None


def _check_topk(student, ids, t_logp, t_rest, caller: str) -> None:
    lead = tuple(student.shape[:-1])
    if ids.dim() != student.dim() or tuple(ids.shape[:-1]) != lead or ids.shape != t_logp.shape:
        raise ValueError(f"{vs.ERROR_PREFIX}.{caller}: topk_ids {tuple(ids.shape)} and "
                         f"topk_logprobs {tuple(t_logp.shape)} must be shaped like the logits "
                         f"with K in the last dim ({lead} + (K,)); logits are "
                         f"{tuple(student.shape)}")
    if ids.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint16):
        raise ValueError(f"{vs.ERROR_PREFIX}.{caller}: topk_ids must be integer token ids, got "
                         f"{ids.dtype}")
    if tuple(t_rest.shape) != lead:
        raise ValueError(f"{vs.ERROR_PREFIX}.{caller}: rest_logprob {tuple(t_rest.shape)} must be "
                         f"shaped like the logits without their vocabulary dim {lead}")


def vocab_parallel_ce_and_topk_kl(
        student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
        rest_logprob: torch.Tensor, labels: Optional[torch.Tensor] = None, *, tp_group,
        temperature: float = 1.0, vocab_size: Optional[int] = None,
        chunk_tokens: int = KL_CHUNK_TOKENS) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(CE, top-K KL) per token on vocabulary-sharded student logits (module docstring).

    Args:
        student_logits: [s, b, v/tp] (any leading shape), this rank's vocabulary shard, fp32 or
            bf16. Receives the gradient.
        topk_ids: [.., K] global token ids of the teacher's top-K (distinct, < vocab_size);
            -1 marks an unused slot (with log-probability -inf).
        topk_logprobs: [.., K] the teacher's log-probabilities of those ids at `temperature`.
        rest_logprob: [..] log of the teacher's mass outside the K ids (-inf: none).
        labels: [..] global label ids for the CE (temperature 1), or None for the KL alone.
        tp_group: the tensor-parallel process group (required; a world-1 group without TP).
        temperature: T of the student's softmax in the KL; must be the teacher's stored T.
        vocab_size: the real vocabulary; padded columns are excluded and get a zero gradient.
        chunk_tokens: tokens per fp32 working chunk.

    Returns:
        (CE per token or None, KL per token), fp32, shaped like the logits without their last
        dim. Not multiplied by T^2, not masked.
    """
    caller = "vocab_parallel_ce_and_topk_kl"
    _check_topk(student_logits, topk_ids, topk_logprobs, rest_logprob, caller)
    if labels is not None:
        vs.check_labels(student_logits, labels, caller)
    plan = vs.make_plan(student_logits, tp_group, vocab_size, want_kl=True,
                      want_ce=labels is not None, reverse=False, temperature=temperature,
                      chunk_tokens=chunk_tokens, caller=caller)
    ce, kl = _TopKLoss.apply(student_logits, topk_ids.detach(), topk_logprobs.detach(),
                             rest_logprob.detach(), labels, plan)
    return (ce if labels is not None else None), kl


def vocab_parallel_topk(logits: torch.Tensor, k: int, *, tp_group, temperature: float = 1.0,
                        vocab_size: Optional[int] = None, chunk_tokens: int = KL_CHUNK_TOKENS
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-K of softmax(logits / T) over vocabulary-sharded logits, without gathering them.

    Returns (ids [.., K] int64 in descending probability, log-probabilities [.., K] fp32,
    log of the mass outside the K ids [..] fp32, -inf when K covers the vocabulary). Every rank
    of `tp_group` gets the same result. Padded columns (>= vocab_size) never enter.
    """
    plan = vs.make_plan(logits, tp_group, vocab_size, want_kl=False, want_ce=False, reverse=False,
                     temperature=temperature, chunk_tokens=chunk_tokens,
                     caller="vocab_parallel_topk")
    if not 1 <= int(k) <= plan.vocab_size:
        raise ValueError(f"{vs.ERROR_PREFIX}.vocab_parallel_topk: k={k} must be in [1, vocab_size="
                         f"{plan.vocab_size}]")
    lead, local = logits.shape[:-1], logits.shape[-1]
    z = logits.detach().reshape(-1, local)
    n, nv, dev = z.shape[0], plan.num_valid, z.device
    vals = torch.full((n, k), float("-inf"), device=dev)
    ids = torch.zeros(n, k, dtype=torch.int64, device=dev)
    kk = min(k, nv)
    if kk > 0:
        for rows in vs.chunk_rows(n, plan.chunk):
            v, i = z[rows, :nv].float().mul(plan.inv_t).topk(kk, dim=-1)
            vals[rows, :kk], ids[rows, :kk] = v, i + plan.start
    if plan.world_size > 1:
        all_v = [torch.empty_like(vals) for _ in range(plan.world_size)]
        all_i = [torch.empty_like(ids) for _ in range(plan.world_size)]
        dist.all_gather(all_v, vals, group=plan.group)
        dist.all_gather(all_i, ids, group=plan.group)
        vals, pick = torch.cat(all_v, dim=-1).topk(k, dim=-1)
        ids = torch.cat(all_i, dim=-1).gather(1, pick)
    # log-normaliser and the mass outside the K ids, with the same shard statistics as the loss
    st = {"m_s": torch.full((n,), float("-inf"), device=dev), "s_s": torch.zeros(n, device=dev),
          "r_s": torch.zeros(n, device=dev)}
    col, inside = vs.local_columns(plan, ids)
    if nv > 0:
        buf = torch.empty(min(plan.chunk, n), nv, dtype=torch.float32, device=dev)
        for rows in vs.chunk_rows(n, plan.chunk):
            _forward_chunk(plan, z[rows, :nv], col[rows], inside[rows],
                           buf[:rows.stop - rows.start], st, rows)
    m, scale = vs.global_max(plan, st["m_s"])
    sums = vs.all_reduce_sum(plan, torch.stack([st["s_s"] * scale, st["r_s"] * scale]))
    lse = m + torch.log(sums[0])
    rest = m + torch.log(sums[1]) - lse
    logp = vals - lse.unsqueeze(-1)
    return ids.view(*lead, k), logp.view(*lead, k), rest.view(lead)
