"""Times optimizer steps of one student (with a fixed teacher or none) the way the trainer runs
them.

Used by bench/gpu_throughput.py. The step is composed from the project's own pieces, as
training/trainer.py composes it: build_gpt_model on a world-1 ParallelContext, DistillationPair,
training/builder.float16_wrap (Megatron-Core's Float16Module; bf16 logits into the loss) +
Megatron-Core DDP + distributed optimizer (training/optimizer.py), training/schedule.
forward_backward and losses.distill.DistillationLoss. training/timing.StageTimer splits each step
into the teacher's forward and the student's forward + backward (it synchronises the GPU at each
boundary, as the trainer's does).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Dict, List, Optional

import torch
from gpu_bench_models import SyntheticDomain, predicted_peak_bytes, train_batches


class Runner:
    """One student (DDP + optimizer) with a fixed teacher (or none): times optimizer steps."""

    def __init__(self, ctx, student_cfg, teacher, padded_vocab: int, vocab: int, bf16: bool,
                 num_domains: int):
        from megatron_ddk.config.schema import ParallelConfig, TrainConfig
        from megatron_ddk.losses.distill import DistillationLoss
        from megatron_ddk.models.build import build_gpt_model
        from megatron_ddk.models.pair import DistillationPair
        from megatron_ddk.training.builder import float16_wrap
        from megatron_ddk.training.optimizer import build_training_objects
        from megatron_ddk.training.timing import StageTimer

        self.ctx, self.vocab = ctx, vocab
        self.student = build_gpt_model(student_cfg, ctx, padded_vocab, bf16=bf16)
        self.pair = DistillationPair(self.student, teacher)
        train = TrainConfig(lr=3e-5, min_lr=3e-6, lr_warmup_iters=1, train_iters=10**6)
        self.model, self.optimizer, _ = build_training_objects(
            float16_wrap(self.pair, bf16), train, ParallelConfig(), ctx, 10**6, bf16=bf16)
        self.loss = DistillationLoss(tp_group=ctx.tp_group, num_domains=num_domains,
                                     vocab_size=vocab, logits_layout="bsv")
        self.timer = StageTimer(teacher)

    def step(self, batches, seq: int, mbs: int) -> float:
        """One optimizer step over `batches`; returns its loss (token mean)."""
        from megatron_ddk.training.schedule import forward_backward

        it = iter(batches)

        def forward_step(_data_iterator, model):
            b = next(it)
            out = model(b["tokens"], b["position_ids"], None)

            def loss_func(output):
                student_logits, teacher_logits = output
                return self.loss(student_logits, labels=b["labels"], loss_mask=b["loss_mask"],
                                 domain_id=b["domain_id"], teacher_logits=teacher_logits)

            return out, loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.timer.start("forward_backward")
        reports = forward_backward(self.ctx, [self.model], forward_step, len(batches), seq, mbs)
        self.timer.stop("forward_backward")
        self.timer.start("optimizer")
        self.optimizer.step()
        self.timer.stop("optimizer")
        total = sum(r["loss"] for r in reports)
        return float(total[0] / total[1])

    def time_steps(self, batches, seq: int, mbs: int, warmup: int, steps: int):
        """(seconds per timed step, last loss, seconds per stage over the timed steps)."""
        for _ in range(warmup):
            loss = self.step(batches, seq, mbs)
        sync()
        self.timer.total.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step(batches, seq, mbs)
        sync()
        split = {k: v / steps for k, v in self.timer.summary().items()}
        return (time.perf_counter() - t0) / steps, loss, split

    def eval_seconds(self, seq: int, mbs: int, domains: int, samples: int) -> float:
        """Wall time of one per-domain evaluation pass of the student (DDK's interval cost)."""
        from megatron_ddk.models.pair import DistillationPair
        from megatron_ddk.training.evaluate import evaluate_domains

        valid = [SyntheticDomain(d, samples, seq, self.vocab) for d in range(domains)]
        eval_student = DistillationPair(self.student, None)
        kwargs = dict(micro_batch_size=mbs, seq_length=seq, vocab_size=self.vocab,
                      with_teacher=False)
        evaluate_domains(eval_student, self.ctx, valid, **kwargs)  # warm-up
        sync()
        t0 = time.perf_counter()
        losses = evaluate_domains(eval_student, self.ctx, valid, **kwargs).student
        sync()
        if not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"evaluation gave non-finite losses {losses}")
        return time.perf_counter() - t0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    """Collect dropped models (their configs hold optimizer references in cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclasses.dataclass
class Row:
    """One line of the table."""

    seq: int
    """Sequence length."""

    run: str
    """What was measured (CPT, KD, DDK, teacher precision)."""

    step_s: Optional[float] = None
    """Seconds per optimizer step (None: not run; `note` says why)."""

    tokens_per_step: int = 0
    """Training tokens per optimizer step."""

    flops_per_step: float = 0.0
    """Model FLOPs per step: student 3x forward + teacher forward (+ evaluation / K for DDK)."""

    peak_gib: Optional[float] = None
    """Peak GPU memory allocated during the row (GiB); None on CPU."""

    fp8_error: Optional[tuple] = None
    """(relative L2, mean KL) of the FP8 teacher's logits against the bf16 teacher's."""

    note: str = ""
    """Free text: loss, evaluation cost, why a row did not run."""

    teacher_s: Optional[float] = None
    """Seconds per step in the teacher's forward (StageTimer)."""

    student_s: Optional[float] = None
    """Seconds per step in the student's forward + backward (schedule time minus teacher)."""

    predicted_gib: Optional[float] = None
    """megatron-ddk plan-memory's prediction for the row without its fixed overhead (GiB)."""


def measure(runner, args, seq: int, vocab: int) -> dict:
    """Time one runner at one sequence length."""
    mbs, nmb = args.micro_batch_size, args.num_microbatches
    batches = train_batches(nmb, mbs, seq, vocab, args.eval_domains, runner.ctx.device,
                            args.seed + seq)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_s, loss, split = runner.time_steps(batches, seq, mbs, args.warmup, args.steps)
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss} at seq {seq}")
    return {"step_s": step_s, "loss": loss, "first_batch": batches[0], "split": split,
            "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                         if torch.cuda.is_available() else None)}


def stage(name: str, ctx, args, cfgs: tuple, teacher, on_seq=None) -> List[Row]:
    """Rows of one run kind: a fresh student (+ optimizer) trained with `teacher` (or none).

    on_seq(seq, runner, measured, row) runs after each sequence length's timing.
    """
    from megatron_ddk.training.flops import FlopCounter

    student_cfg, teacher_cfg, vocab, padded, bf16 = cfgs
    runner = Runner(ctx, student_cfg, teacher, padded, vocab, bf16, args.eval_domains)
    tokens = args.micro_batch_size * args.num_microbatches
    rows = []
    for seq in args.seq_lengths:
        m = measure(runner, args, seq, vocab)
        t_cfg = teacher_cfg if teacher is not None else None
        fc = FlopCounter(student_cfg, t_cfg, seq, padded, tokens * seq)
        predicted = predicted_peak_bytes(student_cfg, t_cfg, padded, seq=seq,
                                         mbs=args.micro_batch_size,
                                         num_microbatches=args.num_microbatches, bf16=bf16,
                                         impl=args.impl)
        split: Dict[str, float] = m["split"]
        row = Row(seq, name, m["step_s"], tokens * seq, fc.student_per_step + fc.teacher_per_step,
                  m["peak_gib"], None, f"loss {m['loss']:.3f}",
                  teacher_s=split.get("teacher_forward", 0.0),
                  student_s=split.get("student_forward_backward"),
                  predicted_gib=predicted / 2**30)
        if on_seq is not None:
            on_seq(seq, runner, m, row)
        rows.append(row)
    runner = None
    free()
    return rows
