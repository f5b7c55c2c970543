"""This rank's vocabulary shard: the plan, chunk loops and statistics shared by the losses.

kl.py (dense KL / CE) and topk_kl.py (top-K KL) both work on logits sharded over the vocabulary
the way Megatron-Core's output layer shards them: rank r of the tensor-parallel group holds the
contiguous columns [r * v/tp, (r + 1) * v/tp) of the padded vocabulary, padding at the end. What
they share lives here, written once:

    make_plan(...)           -> ShardPlan: validated arguments and this rank's place in the vocab
    chunk_rows(n, chunk)     -> the token slices the fp32 working buffers are filled by
    shifted / local_stats    -> x * scale - shift in fp32; a shard's (max, sum exp) per token
    global_max / all_reduce_sum  -> the two collectives that finish the per-token statistics
    local_columns / target_logits  -> global token ids mapped to (and read from) this shard
    student_grad             -> the backward's gradient (zero on padding) and fp32 scratch buffer
    per_token_outputs        -> an autograd Function's outputs, an empty fp32 tensor for None

Every function is pure torch (no state); the autograd Functions stay in kl.py and topk_kl.py.
Must not import: megatron_ddk.models, .data, .ddk, .training, nor of config more than the
schema's KL_CHUNK_TOKENS default (pure torch here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist

ERROR_PREFIX = "megatron_ddk.losses"
"""What every argument error of the losses starts with: f"{ERROR_PREFIX}.{caller}: ..."."""


@dataclass(frozen=True)
class ShardPlan:
    """What one call computes and over which shard; fixed for its forward and backward."""

    group: object
    """The tensor-parallel process group the vocabulary is sharded over."""

    world_size: int
    """Size of `group`; collectives are skipped when it is 1."""

    start: int
    """Global vocabulary index of this rank's first column."""

    num_valid: int
    """Columns of this shard below vocab_size: a prefix of the shard (padding sits at the end)."""

    vocab_size: int
    """The real (unpadded) vocabulary size; labels outside [0, vocab_size) give a NaN CE."""

    want_kl: bool
    """Compute the KL between softmax(student / T) and softmax(teacher / T)."""

    want_ce: bool
    """Compute the cross entropy of softmax(student) (temperature 1) against labels."""

    reverse: bool
    """KL(p_S || p_T) when True, KL(p_T || p_S) when False."""

    inv_t: float
    """1 / temperature."""

    chunk: int
    """Tokens per chunk of the fp32 working buffers."""

    @property
    def share(self) -> bool:
        """CE and KL use the same student softmax (temperature 1)."""
        return self.want_ce and self.want_kl and self.inv_t == 1.0


def make_plan(student: torch.Tensor, tp_group, vocab_size: Optional[int], *, want_kl: bool,
              want_ce: bool, reverse: bool, temperature: float, chunk_tokens: int,
              caller: str) -> ShardPlan:
    """Validate the arguments and locate this rank's shard in the global vocabulary."""
    if tp_group is None:
        raise ValueError(f"{ERROR_PREFIX}.{caller}: tp_group is required (keyword-only); pass "
                         "the tensor-parallel process group, or a world-1 group / the WORLD "
                         "group of a single process when there is no tensor parallelism")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{ERROR_PREFIX}.{caller}: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (gloo on CPU)")
    if not (temperature > 0.0):
        raise ValueError(f"{ERROR_PREFIX}.{caller}: temperature={temperature!r} must be > 0")
    if int(chunk_tokens) < 1:
        raise ValueError(f"{ERROR_PREFIX}.{caller}: chunk_tokens={chunk_tokens!r} must be >= 1")
    if student.dim() < 2:
        raise ValueError(f"{ERROR_PREFIX}.{caller}: logits must be [s, b, v/tp] (any leading "
                         f"shape), got shape {tuple(student.shape)}")
    world_size = dist.get_world_size(tp_group)
    rank = dist.get_rank(tp_group)
    local = student.shape[-1]
    padded = local * world_size
    if vocab_size is None:
        vocab_size = padded
    if not 1 <= int(vocab_size) <= padded:
        raise ValueError(f"{ERROR_PREFIX}.{caller}: vocab_size={vocab_size} must be in "
                         f"[1, {padded}] (the padded vocabulary: {local} columns per rank x "
                         f"{world_size} tensor-parallel ranks)")
    start = rank * local
    num_valid = max(0, min(local, int(vocab_size) - start))
    return ShardPlan(group=tp_group, world_size=world_size, start=start, num_valid=num_valid,
                     vocab_size=int(vocab_size),
                     want_kl=want_kl, want_ce=want_ce, reverse=bool(reverse),
                     inv_t=1.0 / float(temperature), chunk=int(chunk_tokens))


def check_labels(student: torch.Tensor, labels: torch.Tensor, caller: str) -> None:
    """Raise ValueError unless labels are integer ids shaped like the logits without vocab dim."""
    if labels.shape != student.shape[:-1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{ERROR_PREFIX}.{caller}: labels must be integer token ids shaped like "
                         f"the logits without their vocabulary dim {tuple(student.shape[:-1])} "
                         f"([s, b], sequence-first), got {labels.dtype} {tuple(labels.shape)}")


def chunk_rows(num_tokens: int, chunk: int) -> Iterator[slice]:
    """The consecutive token slices of at most `chunk` rows covering [0, num_tokens)."""
    for lo in range(0, num_tokens, chunk):
        yield slice(lo, min(lo + chunk, num_tokens))


def shifted(buf: torch.Tensor, src: torch.Tensor, shift: torch.Tensor,
            scale: float) -> torch.Tensor:
    """buf = src * scale - shift in fp32 (shift: fp32 [k, 1]); one pass when scale is 1."""
    if scale == 1.0:  # fp32 shift promotes the subtraction of bf16 src to fp32
        return torch.sub(src, shift, out=buf)
    return buf.copy_(src).mul_(scale).sub_(shift)


def local_stats(buf: torch.Tensor, src: torch.Tensor,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local (max, sum exp(x - max)) of x = src * scale; buf ends holding exp(x - max)."""
    m = src.amax(dim=-1, keepdim=True).float().mul_(scale)  # scale > 0 keeps the argmax
    e = shifted(buf, src, m, scale).exp_()
    return m.squeeze(-1), e.sum(dim=-1)


def global_max(p: ShardPlan, local_max: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(max over the group, exp(local - global)): the factor that rescales a local sum-exp.

    One all_reduce(MAX) over p.group (none at world size 1); `local_max` is left unchanged. A
    shard without valid columns has a local max of -inf, hence a scale of 0.
    """
    maxes = local_max.clone()
    if p.world_size > 1:
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=p.group)
    return maxes, torch.exp(local_max - maxes)


def all_reduce_sum(p: ShardPlan, sums: torch.Tensor) -> torch.Tensor:
    """Sum `sums` in place over p.group (nothing at world size 1) and return it."""
    if p.world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=p.group)
    return sums


def local_columns(p: ShardPlan, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(column in this shard clamped to a valid index, inside-this-shard mask) of global ids."""
    local = ids - p.start
    inside = (local >= 0) & (local < p.num_valid)
    return local.clamp(0, max(p.num_valid - 1, 0)), inside


def target_logits(p: ShardPlan, student2d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Raw student logit at each token's label if the label is in this shard's valid columns."""
    col, inside = local_columns(p, labels)
    picked = student2d.gather(1, col.unsqueeze(1))
    return torch.where(inside, picked.squeeze(1).float(), 0.0)


def student_grad(p: ShardPlan,
                 zs: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The backward's gradient for the [n, v/tp] student logits and its fp32 scratch buffer.

    The gradient is uninitialised on the valid columns (the chunks write them) and exactly zero
    on the padded ones. The scratch buffer is [min(chunk, n), num_valid] fp32, or None when the
    gradient is fp32 itself (its slice is then the working buffer) or the shard has no valid
    column.
    """
    grad = torch.empty_like(zs, memory_format=torch.contiguous_format)
    grad[:, p.num_valid:] = 0  # padded columns: exactly zero
    if p.num_valid == 0 or grad.dtype == torch.float32:
        return grad, None
    return grad, zs.new_empty(min(p.chunk, zs.shape[0]), p.num_valid, dtype=torch.float32)


def per_token_outputs(student: torch.Tensor, *values: Optional[torch.Tensor]):
    """Per-token values viewed like the logits without their last dim; None: an empty fp32."""
    shape = student.shape[:-1]
    empty = student.new_empty(0, dtype=torch.float32)
    return tuple(empty if v is None else v.view(shape) for v in values)
