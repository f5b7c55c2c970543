"""The distillation loss of Eq. 3 in Megatron-Core's loss_func contract, with per-domain sums.

    loss = lm_loss + gamma * kd_loss              (Eq. 3 of the DDK paper; docs/losses.md)
    loss = lm_loss + gamma * T^2 * kd_loss        (kl_t2_scaling: Hinton's convention)

lm_loss is the student's cross entropy (temperature 1), kd_loss the unscaled KL between
softmax(z / T) of teacher and student (forward by default), both summed over the tokens of
loss_mask. Without a teacher (the paper's CPT) the loss is the CE alone and kd_loss reports 0.
With teacher_ce (ddk.signal: training) the report also holds the teacher's per-domain CE sums,
computed from the teacher logits the KL already has (no extra forward pass).

Megatron-Core's schedules (pipeline_parallel/schedules.py, forward_step_calc_loss) call
`loss_func(output_tensor)`; when it returns three values they are (loss, num_tokens, report):
with `config.calculate_per_token_loss=True` the loss sum is back-propagated as is and the
schedule sums num_tokens; otherwise it divides by num_tokens and the micro-batch count. The
report is stored per micro-batch for the caller. Every report value here is a tensor whose
index 0 holds sums and index 1 token counts, so callers average exactly: add the reports over
micro-batches and data-parallel ranks, then divide [0] by [1].

Must not import: megatron_ddk.models, .data, .ddk, .training. The DistillConfig adapter reads its
argument by attribute, so this file does not import megatron_ddk.config either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Literal, Optional, Tuple

import torch

from megatron_ddk.config.schema import KL_CHUNK_TOKENS
from megatron_ddk.losses.kl import vocab_parallel_ce_and_kl, vocab_parallel_cross_entropy
from megatron_ddk.losses.topk_kl import vocab_parallel_ce_and_topk_kl

logger = logging.getLogger(__name__)

LossOutput = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


@dataclass
class DistillationLoss:
    """Builds Megatron loss_func closures for CE + gamma * KL with per-domain reports.

    Batch tensors come in Megatron's batch layout (labels and loss_mask [b, s], domain_id [b]);
    logits come in the model's layout, `logits_layout`.
    """

    tp_group: object
    """Tensor-parallel process group of the vocabulary shards (a world-1 group without TP)."""

    num_domains: int
    """Number of data domains; domain ids are in [0, num_domains)."""

    vocab_size: Optional[int] = None
    """Real (unpadded) vocabulary size; padded logits are excluded from CE and KL. None = none."""

    gamma: float = 0.2
    """Weight of the KL term (paper: 0.2); the CE weight is 1."""

    temperature: float = 1.0
    """Softmax temperature T of the KL (CE is at T = 1)."""

    kl_t2_scaling: bool = False
    """Multiply the KL by T^2 (Hinton). False is the paper's Eq. 3; equal at T = 1."""

    teacher_ce: bool = False
    """Also report the teacher's per-domain CE sums (domain_teacher_lm_loss) at T = 1, from the
    teacher logits given to the call (ddk.signal: training). One more chunked, vocab-parallel
    pass over those logits, no gradient; exact over TP like the student's CE."""

    reverse: bool = False
    """False: KL(teacher || student) (the paper's KD); True: KL(student || teacher)."""

    chunk_tokens: int = KL_CHUNK_TOKENS
    """Tokens per fp32 working chunk of the vocab-parallel kernels (bounds extra memory)."""

    logits_layout: Literal["sbv", "bsv"] = "sbv"
    """sbv: logits [s, b, v/tp] (Megatron's output layer); bsv: [b, s, v/tp] (GPTModel's
    forward with labels=None transposes to this)."""

    def __post_init__(self) -> None:
        if self.num_domains < 1:
            raise ValueError(f"DistillationLoss.num_domains={self.num_domains} must be >= 1")
        if self.gamma < 0:
            raise ValueError(f"DistillationLoss.gamma={self.gamma} must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"DistillationLoss.temperature={self.temperature} must be > 0")
        if self.logits_layout not in ("sbv", "bsv"):
            raise ValueError(f"DistillationLoss.logits_layout={self.logits_layout!r}: use 'sbv' "
                             "([s, b, v/tp]) or 'bsv' ([b, s, v/tp])")

    def loss_func(self, labels: torch.Tensor, loss_mask: torch.Tensor, domain_id: torch.Tensor,
                  teacher_logits: Optional[torch.Tensor] = None
                  ) -> Callable[[torch.Tensor], LossOutput]:
        """The closure a Megatron forward_step returns next to the student's output tensor."""
        return partial(self.__call__, labels=labels, loss_mask=loss_mask, domain_id=domain_id,
                       teacher_logits=teacher_logits)

    def __call__(self, student_logits: torch.Tensor, *, labels: torch.Tensor,
                 loss_mask: torch.Tensor, domain_id: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor] = None,
                 teacher_topk: Optional[Tuple[torch.Tensor, ...]] = None) -> LossOutput:
        """(loss_sum, num_tokens, report) for one micro-batch; see the module docstring.

        Args:
            student_logits: this rank's vocabulary shard, layout `logits_layout`.
            labels: [b, s] global token ids.
            loss_mask: [b, s], 1 where a token counts (float or bool).
            domain_id: [b] integer domain of each sample.
            teacher_logits: same shape as student_logits, or None (CPT: CE only).
            teacher_topk: instead of teacher_logits, the offline teacher (data/teacher_store.py):
                (topk_ids [b, s, K], topk_logprobs [b, s, K], rest_logprob [b, s]) in the batch
                layout; the KL is then the top-K KL of losses/topk_kl.py (forward only).
        """
        sbv = self.logits_layout == "sbv"
        lead = tuple(student_logits.shape[:-1])
        if labels.dim() != 2 or lead != (tuple(labels.shape[::-1]) if sbv else tuple(labels.shape)):
            raise ValueError(f"DistillationLoss: labels {tuple(labels.shape)} ([b, s]) do not "
                             f"match logits {tuple(student_logits.shape)} in layout "
                             f"{self.logits_layout!r}")
        if loss_mask.shape != labels.shape or domain_id.shape != labels.shape[:1]:
            raise ValueError(f"DistillationLoss: loss_mask {tuple(loss_mask.shape)} must be "
                             f"{tuple(labels.shape)} and domain_id {tuple(domain_id.shape)} must "
                             f"be ({labels.shape[0]},)")
        tok_labels = labels.t().contiguous() if sbv else labels
        mask = (loss_mask.t() if sbv else loss_mask) != 0
        if teacher_topk is not None:
            ce, kl = self._topk_ce_and_kl(student_logits, teacher_topk, tok_labels, sbv)
        elif teacher_logits is None:
            ce = vocab_parallel_cross_entropy(student_logits, tok_labels, tp_group=self.tp_group,
                                              vocab_size=self.vocab_size,
                                              chunk_tokens=self.chunk_tokens)
            kl = None
        else:
            ce, kl = vocab_parallel_ce_and_kl(
                student_logits, teacher_logits, tok_labels, tp_group=self.tp_group,
                temperature=self.temperature, reverse=self.reverse, vocab_size=self.vocab_size,
                chunk_tokens=self.chunk_tokens)
        # where, not *: masked positions may hold NaN (labels outside the vocabulary).
        ce = torch.where(mask, ce, 0.0)
        lm_sum = ce.sum()
        num_tokens = mask.sum()
        if kl is None:
            kd_sum = torch.zeros((), device=lm_sum.device)
            loss_sum = lm_sum
        else:
            kl = torch.where(mask, kl, 0.0)
            kd_sum = kl.sum()
            scale = self.temperature ** 2 if self.kl_t2_scaling else 1.0
            loss_sum = lm_sum + (self.gamma * scale) * kd_sum
        report = self._report(lm_sum, kd_sum, loss_sum, num_tokens, ce, kl, mask, domain_id, sbv)
        if self.teacher_ce and teacher_logits is not None:
            report["domain_teacher_lm_loss"] = self._teacher_ce(
                teacher_logits, tok_labels, mask, domain_id, sbv, report["domain_lm_loss"][1])
        return loss_sum, num_tokens.to(torch.int), report

    def _teacher_ce(self, teacher_logits, tok_labels, mask, domain_id, sbv: bool,
                    tokens: torch.Tensor) -> torch.Tensor:
        """[2, num_domains]: the teacher's CE sums per domain (T = 1) and the token counts."""
        with torch.no_grad():
            tce = vocab_parallel_cross_entropy(teacher_logits.detach(), tok_labels,
                                               tp_group=self.tp_group, vocab_size=self.vocab_size,
                                               chunk_tokens=self.chunk_tokens)
            tce = torch.where(mask, tce, 0.0)
        return torch.stack([domain_sums(tce, domain_id, self.num_domains, sbv), tokens])

    def _topk_ce_and_kl(self, student_logits, teacher_topk, tok_labels, sbv: bool):
        """(CE, top-K KL) per token against a stored teacher ([b, s, ..] batch layout)."""
        if self.reverse:
            raise ValueError("DistillationLoss: reverse KL needs the teacher's whole "
                             "distribution; an offline top-K teacher serves forward KL only")
        ids, logp, rest = (t.transpose(0, 1) if sbv else t for t in teacher_topk)
        return vocab_parallel_ce_and_topk_kl(
            student_logits, ids, logp, rest, tok_labels, tp_group=self.tp_group,
            temperature=self.temperature, vocab_size=self.vocab_size,
            chunk_tokens=self.chunk_tokens)

    def _report(self, lm_sum, kd_sum, loss_sum, num_tokens, ce, kl, mask, domain_id,
                sbv: bool) -> Dict[str, torch.Tensor]:
        """[sum, count] tensors: totals ([2]) and per domain ([2, num_domains])."""
        count = num_tokens.to(torch.float32).detach()

        def per_domain(x: torch.Tensor) -> torch.Tensor:
            return domain_sums(x, domain_id, self.num_domains, sbv)

        tokens = per_domain(mask.to(torch.float32))
        ce_dom = per_domain(ce)
        kl_dom = per_domain(kl) if kl is not None else torch.zeros_like(ce_dom)
        return {
            "lm_loss": torch.stack([lm_sum.detach(), count]),
            "kd_loss": torch.stack([kd_sum.detach().to(torch.float32), count]),
            "loss": torch.stack([loss_sum.detach(), count]),
            "domain_lm_loss": torch.stack([ce_dom, tokens]),
            "domain_kd_loss": torch.stack([kl_dom, tokens]),
        }


def domain_sums(x: torch.Tensor, domain_id: torch.Tensor, num_domains: int,
                sbv: bool) -> torch.Tensor:
    """[num_domains] float32: per-token values x ([s, b] when sbv, else [b, s]) summed over each
    sample's tokens, then over the samples of each domain (domain_id [b]); detached."""
    per_sample = x.detach().to(torch.float32).sum(dim=0 if sbv else 1)
    out = torch.zeros(num_domains, dtype=torch.float32, device=x.device)
    return out.index_add_(0, domain_id.to(torch.long), per_sample)


def distillation_loss_from_config(distill, *, tp_group, num_domains: int,
                                  vocab_size: Optional[int] = None,
                                  logits_layout: str = "sbv",
                                  teacher_ce: bool = False) -> DistillationLoss:
    """Build the loss from a megatron_ddk.config.DistillConfig (gamma, temperature, T^2 switch,
    direction, chunk size); the teacher's presence is decided per call by passing teacher_logits
    or not. teacher_ce: also report the teacher's per-domain CE (ddk.signal: training)."""
    if distill.kl_direction not in ("forward", "reverse"):
        raise ValueError(f"distill.kl_direction={distill.kl_direction!r}: use 'forward' "
                         "(KL(teacher || student)) or 'reverse' (KL(student || teacher))")
    return DistillationLoss(tp_group=tp_group, num_domains=num_domains, vocab_size=vocab_size,
                            gamma=float(distill.gamma), temperature=float(distill.temperature),
                            kl_t2_scaling=bool(distill.kl_t2_scaling), teacher_ce=teacher_ce,
                            reverse=distill.kl_direction == "reverse",
                            chunk_tokens=int(distill.kl_chunk_tokens),
                            logits_layout=logits_layout)
