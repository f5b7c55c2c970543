"""The student's DDP wrapper, Megatron optimizer and LR schedule, built from the run config.

Only the student goes through here: the teacher is never wrapped or optimised. The schedule is
Megatron-Core's OptimizerParamScheduler stepped once per optimizer step, so its units are
optimizer steps (iterations), not samples as in Megatron-LM's driver.
"""

from __future__ import annotations

from typing import Tuple

from megatron_ddk.config.schema import ParallelConfig, TrainConfig
from megatron_ddk.parallel.state import ParallelContext


def wrap_ddp(model, parallel: ParallelConfig, ctx: ParallelContext):
    """Megatron-Core DistributedDataParallel around this stage of the student."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None if not parallel.overlap_grad_reduce else 40_000_000,
    )
    return DistributedDataParallel(model.config, ddp_config, model,
                                   pg_collection=ctx.pg_collection)


def build_optimizer(ddp_model, train: TrainConfig, parallel: ParallelConfig, ctx: ParallelContext,
                    bf16: bool):
    """Megatron-Core Adam (plain or distributed) over the student's parameters only."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=bf16, params_dtype=None,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    return get_megatron_optimizer(config, [ddp_model], use_gloo_process_groups=False,
                                  pg_collection=ctx.pg_collection)


def build_scheduler(optimizer, train: TrainConfig, num_iters: int):
    """Linear warm-up from lr_warmup_init to lr, then decay to min_lr (units: optimizer steps)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = train.lr_decay_iters if train.lr_decay_iters is not None else num_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=train.lr_warmup_init, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters, lr_decay_steps=max(decay, train.lr_warmup_iters + 1),
        lr_decay_style=train.lr_decay_style, start_wd=train.weight_decay,
        end_wd=train.weight_decay, wd_incr_steps=max(num_iters, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False)


def build_training_objects(model, train: TrainConfig, parallel: ParallelConfig,
                           ctx: ParallelContext, num_iters: int, bf16: bool = False) -> Tuple:
    """(ddp_model, optimizer, scheduler) for the student; wires Megatron's grad hooks."""
    from megatron.core.distributed import finalize_model_grads

    ddp_model = wrap_ddp(model, parallel, ctx)
    optimizer = build_optimizer(ddp_model, train, parallel, ctx, bf16)
    scheduler = build_scheduler(optimizer, train, num_iters)
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if parallel.overlap_grad_reduce:
        config.no_sync_func = ddp_model.no_sync
        config.grad_sync_func = ddp_model.start_grad_sync
    if parallel.overlap_param_gather and parallel.use_distributed_optimizer:
        config.param_sync_func = ddp_model.start_param_sync
    return ddp_model, optimizer, scheduler
