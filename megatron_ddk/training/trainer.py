"""The training loop: DDK intervals, Megatron-Core schedules, logging, checkpoints, exits.

    for each step:
        at an interval boundary (every ddk.interval steps): evaluate the student per domain
            (teacher once, cached), let the controller pick the weights, build the interval index
        one optimizer step on the next global batch (micro-batches through the schedule)
        log, checkpoint, stop on budget / exit interval / exit duration / SIGTERM / SIGUSR1

A run is CPT, KD, DDK or an ablation by config alone (no teacher = CPT; ddk.policy chooses the
mixture rule).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.config import RunConfig, config_to_yaml, to_dict
from megatron_ddk.console import CommandFailed
from megatron_ddk.data.mixture import IntervalMixture, collate, micro_batches_for_rank
from megatron_ddk.ddk.controller import DDKController
from megatron_ddk.losses.distill import distillation_loss_from_config
from megatron_ddk.models.checkpoint_layout import ResolvedCheckpoint
from megatron_ddk.models.pair import DistillationPair
from megatron_ddk.parallel.reduce import reduce_named
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training import builder
from megatron_ddk.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from megatron_ddk.training.evaluate import evaluate_domains
from megatron_ddk.training.flops import FlopCounter
from megatron_ddk.training.metrics import RunLogger, step_line
from megatron_ddk.training.optimizer import build_training_objects
from megatron_ddk.training.prepare import RunCheckpoints, run_checkpoints
from megatron_ddk.training.schedule import run_batches
from megatron_ddk.training.timing import StageTimer
from megatron_ddk.training.wandb_log import wandb_factory

logger = logging.getLogger(__name__)


class NonFiniteLossError(CommandFailed):
    """The loss became NaN or inf; the message names the step and the batch's domains."""

    exit_code = 3


class Trainer:
    """Builds a run from its config and trains it; `run()` returns the process exit code."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, stop_flag=None,
                 checkpoints: Optional[RunCheckpoints] = None):
        """`checkpoints`: the run's checkpoints as training/prepare.py resolved them (None:
        resolve them now)."""
        self.cfg, self.ctx = cfg, ctx
        checkpoints = checkpoints or run_checkpoints(cfg)
        self.stop_flag = stop_flag or (lambda: False)
        self.iters = builder.num_iters(cfg)
        self.gbs, self.mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
        self.num_microbatches = self.gbs // (self.mbs * ctx.dp_size)
        self.data = builder.build_data(cfg, ctx, cfg.ddk.valid_samples_per_domain)
        self.names = self.data.manifest.names()
        self.padded_vocab = builder.model_vocab(cfg, self.data.vocab_size, ctx.tp_size)
        self.student, self.source = builder.build_models(cfg, ctx, self.padded_vocab, self.data,
                                                         checkpoints)
        self.pair = DistillationPair(self.student, self.source.model)
        self.eval_student = DistillationPair(self.student, None)
        self.model, self.optimizer, self.scheduler = build_training_objects(
            self._maybe_float16(self.pair), cfg.train, cfg.parallel, ctx, self.iters,
            bf16=builder.use_bf16(cfg))
        self.loss = distillation_loss_from_config(
            cfg.distill, tp_group=ctx.tp_group, num_domains=len(self.names),
            vocab_size=self.data.vocab_size, logits_layout="bsv",
            teacher_ce=cfg.ddk.signal == "training" and self.source.training_ce)
        self.mixture = IntervalMixture(self.data.datasets.num_train_samples, self.gbs,
                                       cfg.ddk.interval, cfg.train.seed, self.names)
        self.controller = DDKController(
            cfg.ddk, self.names, self.data.manifest.natural_weights(),
            [d.initial_weight for d in self.data.manifest.domains],
            samples_per_epoch=self.data.datasets.num_train_samples,
            samples_per_interval=cfg.ddk.interval * self.gbs)
        self.step = 0
        self.meta = builder.checkpoint_metadata(cfg, self.padded_vocab, self.data,
                                                checkpoints.resume)
        self.timer = StageTimer(self.source.model)
        self.flops = FlopCounter(cfg.model, self.source.flops_model, cfg.data.seq_length,
                                 self.padded_vocab, self.gbs * cfg.data.seq_length)
        # per domain, since the last interval start: student CE sum, tokens, teacher CE sum
        self.domain_train = np.zeros((3, len(self.names)))
        if checkpoints.resume is not None:
            self._resume(checkpoints.resume)
        self.log = RunLogger(cfg.logging.run_dir, ctx.is_logging_rank, cfg.logging.tensorboard,
                             resume_step=self.step, wandb=wandb_factory(cfg, self.step))
        self.log.write_metadata(config_to_yaml(cfg), dict(
            self.meta, world_size=ctx.world_size, tp=ctx.tp_size, pp=ctx.pp_size,
            dp=ctx.dp_size, train_iters=self.iters))

    # ------------------------------------------------------------------------------ set-up
    def _maybe_float16(self, module):
        return builder.float16_wrap(module, builder.use_bf16(self.cfg))

    def _resume(self, ckpt: ResolvedCheckpoint) -> None:
        state = load_training_checkpoint(
            ckpt, model=self.student, optimizer=self.optimizer, ctx=self.ctx,
            model_dict=to_dict(self.cfg.model), padded_vocab_size=self.padded_vocab,
            tokenizer_hash=self.data.tokenizer_hash, finetune=self.cfg.checkpoint.finetune)
        if state is None:
            return
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.controller.load_state_dict(state["controller"])
        self.mixture.load_state_dict(state["mixture"])
        self.domain_train = np.asarray(state["domain_train"], dtype=np.float64)
        if self.domain_train.shape[0] == 2:  # checkpoints from before the teacher CE row
            self.domain_train = np.vstack([self.domain_train, np.zeros(len(self.names))])

    def _run_state(self) -> Dict[str, Any]:
        return {"step": self.step, "consumed_samples": self.step * self.gbs,
                "scheduler": self.scheduler.state_dict(),
                "controller": self.controller.state_dict(), "mixture": self.mixture.state_dict(),
                "domain_train": self.domain_train.tolist()}

    def save(self) -> None:
        """Checkpoint now (all ranks)."""
        if not self.cfg.checkpoint.save:
            return
        self.timer.start("checkpoint")
        save_training_checkpoint(
            self.cfg.checkpoint.save, self.step, model=self.student, optimizer=self.optimizer,
            ctx=self.ctx, run_state=self._run_state(), metadata=self.meta,
            config_yaml=config_to_yaml(self.cfg), keep_last=self.cfg.checkpoint.keep_last)
        self.timer.stop("checkpoint")

    # ------------------------------------------------------------------------------ DDK
    def _start_interval(self) -> None:
        """Measure what the policy needs, choose the weights, build the interval's index.

        Validation signal: one forward pass over the validation sets (the teacher's once),
        timed as ddk_eval. Training signal: the per-domain CE sums the loss reported over the
        interval that just ended (no forward pass; ddk_eval stays 0). The validation
        evaluation's per-sample losses go to the controller too (ratio_log_se / ratio_ci95 of
        the interval record; an offline store holds no per-sample teacher losses)."""
        student_losses = teacher_losses = signal_tokens = None
        per_sample: Dict[str, Any] = {}
        self.timer.total["ddk_eval"] += 0.0  # present in the split even when nothing runs
        if self.controller.needs_validation():
            self.timer.start("ddk_eval")
            with_teacher = self.controller.teacher_losses is None and self.source.evaluates_online
            model = self.pair if with_teacher else self.eval_student
            res = evaluate_domains(
                model, self.ctx, self.data.datasets.valid, micro_batch_size=self.mbs,
                seq_length=self.cfg.data.seq_length, vocab_size=self.data.vocab_size,
                with_teacher=with_teacher, chunk_tokens=self.cfg.distill.kl_chunk_tokens)
            student_losses = res.student
            if self.controller.teacher_losses is None:  # measured once (online or by a store)
                teacher_losses = self.source.valid_losses(res.teacher)
            per_sample = dict(student_sample_losses=res.student_samples,
                              teacher_sample_losses=res.teacher_samples,
                              sample_tokens=res.sample_tokens)
            self.timer.stop("ddk_eval")
        elif self.loss.teacher_ce and self.controller.interval >= 0:
            s_sum, signal_tokens, t_sum = self.domain_train
            with np.errstate(invalid="ignore", divide="ignore"):  # no tokens: NaN, carried
                student_losses = np.where(signal_tokens > 0, s_sum / signal_tokens, np.nan)
                teacher_losses = np.where(signal_tokens > 0, t_sum / signal_tokens, np.nan)
        self.timer.start("ddk_mixture")
        consumed = self.mixture.samples_consumed
        weights = self.controller.next_weights(
            self.step, student_losses, teacher_losses, samples_consumed=consumed,
            tokens_consumed=consumed * self.cfg.data.seq_length, signal_tokens=signal_tokens,
            **per_sample)
        self._check_same_on_all_ranks(weights)
        steps = min(self.cfg.ddk.interval, self.iters - self.step)
        self.mixture.start_interval(weights, num_steps=steps)
        self.timer.stop("ddk_mixture")
        self._log_interval()

    def _check_same_on_all_ranks(self, weights: np.ndarray) -> None:
        """Every rank must sample the same mixture; a divergence is a bug, never ignored."""
        if not dist.is_initialized() or self.ctx.world_size == 1:
            return
        mine = torch.as_tensor(weights, dtype=torch.float64)
        gathered = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, mine)
        if any(not torch.equal(g, mine) for g in gathered):
            raise RuntimeError(f"DDK weights differ across ranks at step {self.step}: "
                               f"{[g.tolist() for g in gathered]}")

    def _log_interval(self) -> None:
        rec = dict(self.controller.history[-1])
        train = self.domain_train
        rec["train_lm_loss"] = [float(s / c) if c else None for s, c in zip(*train[:2])]
        rec["domains"] = self.names
        rec["wraps"] = self.mixture.num_wraps.tolist()
        self.domain_train = np.zeros_like(self.domain_train)
        self.log.record("interval", rec)
        for key in ("weights", "r", "ppl_student", "ppl_teacher", "ratio", "epochs",
                    "samples_consumed", "train_lm_loss"):
            values = rec.get(key)
            if values is not None:
                self.log.scalars(self.step, {f"{n}": v for n, v in zip(self.names, values)
                                             if v is not None}, prefix=f"ddk/{key}/")

    # ------------------------------------------------------------------------------ step
    def _loss_of(self, batch: Dict[str, torch.Tensor]):
        """The distillation loss of one micro-batch's (student, teacher) output."""
        device = self.ctx.device
        labels, mask = batch["labels"].to(device), batch["loss_mask"].to(device)
        domains = batch["domain_id"].to(device)

        def loss_func(output):
            student_logits, teacher_logits = output  # teacher_logits: None unless online
            topk = self.source.targets(batch, device, self.timer)  # None unless a store
            return self.loss(student_logits, labels=labels, loss_mask=mask, domain_id=domains,
                             teacher_logits=teacher_logits, teacher_topk=topk)

        return loss_func

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step on the next global batch; returns this step's metrics."""
        global_batch = self.mixture.next_global_batch()
        self.source.check_covered(global_batch)  # every rank stops at the same step
        entries = micro_batches_for_rank(global_batch, self.ctx.dp_rank, self.ctx.dp_size,
                                         self.mbs)
        batches = [collate(e, self.data.datasets.train) for e in entries]
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.timer.start("forward_backward")
        reports = run_batches(self.ctx, self.model, batches, self._loss_of,
                              self.cfg.data.seq_length, self.mbs)
        self.timer.stop("forward_backward")
        totals = self._reduce_reports(reports)
        if not math.isfinite(totals["loss"]):
            doms = sorted({self.names[d] for mb in entries for d, _ in mb})
            raise NonFiniteLossError(f"non-finite loss {totals['loss']} at step {self.step + 1}; "
                                     f"the batch held domain(s) {doms}; lower train.lr or check "
                                     f"the data of those domains")
        self.timer.start("optimizer")
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.timer.stop("optimizer")
        self.step += 1
        totals.update(step=self.step, consumed_samples=self.step * self.gbs,
                      lr=float(self.optimizer.param_groups[0]["lr"]),
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      update_successful=bool(ok))
        return totals

    def _reduce_reports(self, reports) -> Dict[str, float]:
        """Exact means over micro-batches and DP ranks, shared with every rank."""
        n, keys = len(self.names), ("loss", "lm_loss", "kd_loss")
        sums = {k: torch.zeros(2, dtype=torch.float64) for k in keys}  # [sum, tokens]
        sums["domain_lm_loss"] = torch.zeros(2, n, dtype=torch.float64)
        sums["domain_teacher_lm_loss"] = torch.zeros(n, dtype=torch.float64)
        if self.ctx.is_last_stage and self.ctx.tp_rank == 0:  # one copy of each DP shard's sums
            for r in reports:
                for k in keys:
                    sums[k] += r[k].detach().double().cpu()
                sums["domain_lm_loss"] += r["domain_lm_loss"].double().cpu()
                if "domain_teacher_lm_loss" in r:  # ddk.signal: training
                    sums["domain_teacher_lm_loss"] += r["domain_teacher_lm_loss"][0].double().cpu()
        totals = reduce_named(sums)
        self.domain_train += torch.cat([totals["domain_lm_loss"],
                                        totals["domain_teacher_lm_loss"][None]]).numpy()
        count = max(float(totals["loss"][1]), 1.0)
        return {k: float(totals[k][0] / count) for k in keys}

    # ------------------------------------------------------------------------------ loop
    def _should_stop(self, started: float) -> Optional[str]:
        t = self.cfg.train
        reason = None
        if self.stop_flag():
            reason = "signal"
        elif t.exit_interval and self.step % t.exit_interval == 0:
            reason = "exit_interval"
        elif t.exit_duration_minutes and (time.time() - started) / 60 >= t.exit_duration_minutes:
            reason = "exit_duration"
        flag = torch.tensor([1.0 if reason else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() and reason is None:
            reason = "another rank"
        return reason

    def _log_step(self, rec: Dict[str, Any], window: List[float], started: float) -> None:
        steps = self.cfg.logging.log_interval
        seconds = sum(window[-steps:])
        tokens = self.gbs * self.cfg.data.seq_length * min(steps, len(window))
        rec["tokens_per_sec"] = tokens / seconds if seconds else 0.0
        rec["mfu"] = self.flops.mfu(min(steps, len(window)), seconds, self.ctx.world_size)
        rec["weights"] = [float(x) for x in self.mixture.state_dict()["weights"]]
        rec["interval"] = self.mixture.current_interval
        rec["timing"] = self.timer.summary()
        elapsed = time.time() - started
        remaining = (self.iters - self.step) * (seconds / max(1, min(steps, len(window))))
        self.log.record("step", rec)
        self.log.scalars(self.step, {k: rec.get(k) for k in (
            "loss", "lm_loss", "kd_loss", "lr", "grad_norm", "tokens_per_sec", "mfu")}, "train/")
        self.log.scalars(self.step, rec["timing"], "timing/")
        if self.ctx.is_logging_rank:
            logger.info(step_line(rec, self.iters, elapsed, remaining))

    def run(self) -> int:
        """Train to the budget (or an exit condition); returns the exit code."""
        started = time.time()
        window: List[float] = []
        reason = None
        logger.info("training %d steps (%d left), %d domains, %s, policy %s", self.iters,
                    self.iters - self.step, len(self.names),
                    self.source.describe(), self.cfg.ddk.policy)
        self.model.train()
        while self.step < self.iters:
            if self.mixture.steps_left == 0:
                self._start_interval()
            t0 = time.time()
            rec = self.train_step()
            window.append(time.time() - t0)
            if self.step % self.cfg.logging.log_interval == 0 or self.step == self.iters:
                self._log_step(rec, window, started)
            save_every = self.cfg.checkpoint.save_interval
            reason = self._should_stop(started)
            if reason or (save_every and self.step % save_every == 0):
                self.save()
            if reason:
                logger.info("stopping at step %d (%s); checkpoint saved", self.step, reason)
                break
        else:
            if not (self.cfg.checkpoint.save_interval
                    and self.step % self.cfg.checkpoint.save_interval == 0):
                self.save()
        self.log.record("end", {"step": self.step, "reason": reason or "budget",
                                "timing": self.timer.summary(),
                                "elapsed_s": time.time() - started,
                                "teacher_store_samples": self.source.samples_served})
        self.log.close()
        return 0
