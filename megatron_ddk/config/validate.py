"""Static configuration checks: schema-independent cross-field rules that hold on any host.

They run everywhere (CI included, on every shipped preset). The allowed values of single fields
(bounds, choices) are config/ranges.py's table, whose errors come first; the rules here involve
several fields (or the world size) and skip what a range error already names, so that nothing
divides by zero. Checks that need the host (Transformer Engine importable, GPU capability, NCCL)
live in host.py and run at launch. Every message names the field, the bad value and what to do.
Imports nothing from megatron_ddk but the config package.
"""

from __future__ import annotations

import math
from typing import List, Optional

from megatron_ddk.config.loader import ConfigError
from megatron_ddk.config.pipeline_split import pair_split_errors as pipeline_pair_errors
from megatron_ddk.config.pipeline_split import split_errors
from megatron_ddk.config.ranges import range_errors
from megatron_ddk.config.schema import ModelConfig, RunConfig


def _model_checks(m: ModelConfig, where: str, cfg: RunConfig,
                  check_split: bool = True) -> List[str]:
    errs = []
    tp = cfg.parallel.tensor_model_parallel_size
    if tp < 1 or m.num_attention_heads < 1:  # range_errors names them; nothing divides by zero
        return errs
    if m.num_attention_heads % tp:
        errs.append(f"{where}.num_attention_heads={m.num_attention_heads} is not divisible by "
                    f"parallel.tensor_model_parallel_size={tp}; choose a TP size that divides it")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        errs.append(f"{where}.num_query_groups={groups} must divide "
                    f"num_attention_heads={m.num_attention_heads}")
    if groups % tp:
        errs.append(f"{where}.num_query_groups={groups} is not divisible by "
                    f"parallel.tensor_model_parallel_size={tp}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        errs.append(f"{where}.hidden_size={m.hidden_size} is not divisible by num_attention_heads="
                    f"{m.num_attention_heads}; set kv_channels explicitly")
    if cfg.data.seq_length > m.max_position_embeddings:
        errs.append(f"data.seq_length={cfg.data.seq_length} exceeds "
                    f"{where}.max_position_embeddings={m.max_position_embeddings}")
    if m.fp8 is not None and m.transformer_impl != "transformer_engine":
        errs.append(f"{where}.fp8={m.fp8!r} needs {where}.transformer_impl='transformer_engine'")
    if (m.padded_vocab_size is not None and m.vocab_size is not None
            and m.padded_vocab_size < m.vocab_size):
        errs.append(f"{where}.padded_vocab_size={m.padded_vocab_size} is smaller than "
                    f"vocab_size={m.vocab_size}")
    if check_split:  # with a teacher, pair_pipeline_split_errors checks both models together
        errs += pipeline_split_errors(m, where, cfg.parallel.pipeline_model_parallel_size)
    return errs


def pipeline_split_errors(m: ModelConfig, where: str, pp: int) -> List[str]:
    """Why the layers of `m` cannot be split over `pp` stages (empty when they can); the rule
    is config/pipeline_split.pipeline_stage_layers."""
    return split_errors(m.num_layers, m.num_layers_in_first_pipeline_stage,
                        m.num_layers_in_last_pipeline_stage, where, pp)


def pair_pipeline_split_errors(student: ModelConfig, teacher: ModelConfig, pp: int) -> List[str]:
    """pipeline_pair_errors for the run config's model and distill.teacher sections."""
    def spec(m: ModelConfig) -> tuple:
        return (m.num_layers, m.num_layers_in_first_pipeline_stage,
                m.num_layers_in_last_pipeline_stage)

    return pipeline_pair_errors(spec(student), spec(teacher), pp)


def _parallel_checks(cfg: RunConfig, world_size: Optional[int]) -> List[str]:
    p, errs = cfg.parallel, []
    if p.sequence_parallel and cfg.model.transformer_impl != "transformer_engine":
        errs.append("parallel.sequence_parallel=true needs model.transformer_impl="
                    "'transformer_engine' (the local spec cannot do it)")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        errs.append("parallel.overlap_param_gather=true needs "
                    "parallel.use_distributed_optimizer=true")
    if world_size is not None:
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size < 1:
            errs.append(f"world size {world_size}: must be >= 1 (processes to launch)")
        elif mp < 1 or cfg.train.micro_batch_size < 1:
            pass  # out of range: range_errors names the field
        elif world_size % mp:
            errs.append(f"world size {world_size} is not divisible by tensor x pipeline parallel "
                        f"size {mp} (parallel.tensor_model_parallel_size="
                        f"{p.tensor_model_parallel_size} x parallel.pipeline_model_parallel_size="
                        f"{p.pipeline_model_parallel_size}); launch a multiple of {mp} processes "
                        f"or lower them")
        else:
            dp = world_size // mp
            t = cfg.train
            if t.global_batch_size % (t.micro_batch_size * dp):
                errs.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size "
                            f"{dp}")
    return errs


def _train_checks(cfg: RunConfig) -> List[str]:
    t, errs = cfg.train, []
    batches_ok = t.micro_batch_size >= 1 and t.global_batch_size >= 1  # else: range_errors
    if batches_ok and t.global_batch_size % t.micro_batch_size:
        errs.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                    f"train.micro_batch_size={t.micro_batch_size}")
    if (t.train_iters is None) == (t.train_tokens is None):
        errs.append(f"train.train_iters={t.train_iters}, train.train_tokens={t.train_tokens}: set "
                    f"exactly one of them")
    iters = train_iters(cfg) if batches_ok and cfg.data.seq_length >= 1 else None
    if t.min_lr > t.lr:
        errs.append(f"train.lr={t.lr}, train.min_lr={t.min_lr}: need 0 <= min_lr <= lr; lower "
                    f"min_lr or raise lr")
    decay = t.lr_decay_iters if t.lr_decay_iters is not None else iters
    if (decay is not None and t.lr_decay_style != "constant"
            and 0 <= t.lr_warmup_iters and t.lr_warmup_iters >= decay):
        errs.append(f"train.lr_warmup_iters={t.lr_warmup_iters} must be smaller than the decay "
                    f"length {decay} (train.lr_decay_iters, or train_iters when unset)")
    return errs


def train_iters(cfg: RunConfig) -> Optional[int]:
    """Optimizer steps of the run: train_iters, or train_tokens over tokens per step (ceil)."""
    t = cfg.train
    if t.train_iters is not None:
        return t.train_iters
    if t.train_tokens is not None:
        return math.ceil(t.train_tokens / (t.global_batch_size * cfg.data.seq_length))
    return None


def _distill_checks(cfg: RunConfig) -> List[str]:
    d, k, errs = cfg.distill, cfg.ddk, []
    if d.teacher is not None and not d.teacher_load:
        what = "set" if isinstance(d.teacher, ModelConfig) else d.teacher
        errs.append(f"distill.teacher is {what}"
                    " but distill.teacher_load is empty; give the teacher's "
                    "checkpoint folder")
    if k.policy in ("ddk", "ddk_no_smoothing") and d.teacher is None:
        errs.append(f"ddk.policy={k.policy!r} needs a teacher (distill.teacher); without one use "
                    f"policy 'static' (CPT) or 'equal'")
    if k.weight_floor is not None and k.weight_cap is not None and k.weight_floor > k.weight_cap:
        errs.append(f"ddk.weight_floor={k.weight_floor} is above ddk.weight_cap={k.weight_cap}")
    if k.initial_weights is not None:
        errs.append(f"ddk.initial_weights={k.initial_weights!r} was removed: write "
                    f"ddk.initial_sampling (natural | uniform | eq1 | manifest) for interval 0's "
                    f"data; Eq. 2's prior r_0 is always Eq. 1 (docs/ddk.md)")
    if k.signal == "training" and k.initial_sampling == "eq1":
        errs.append("ddk.initial_sampling='eq1' with ddk.signal='training': nothing is measured "
                    "before step 1, so r_0 is uniform; use initial_sampling natural or uniform")
    return errs + offline_teacher_errors(cfg)


def offline_teacher_errors(cfg: RunConfig) -> List[str]:
    """What an offline teacher store (distill.teacher_logits, top-K) cannot serve: the one place
    of these rules (static: check-config names them before anything is built)."""
    d, errs = cfg.distill, []
    root = getattr(d, "teacher_logits", None)
    if not root:
        return errs
    if d.kl_direction != "forward":
        errs.append(f"distill.kl_direction={d.kl_direction!r} with distill.teacher_logits={root}: "
                    "reverse KL weighs the log-ratio by the student over the whole vocabulary, "
                    "which a top-K store cannot give; use kl_direction: forward, or the online "
                    "teacher (teacher_logits: null)")
    if cfg.ddk.signal == "training":
        errs.append("ddk.signal='training' needs the teacher's exact CE on the training batches, "
                    "which an offline store (distill.teacher_logits, top-K) does not hold; use "
                    "ddk.signal='validation' or the online teacher")
    return errs


def static_errors(cfg: RunConfig, world_size: Optional[int] = None) -> List[str]:
    """All static problems of a config (empty list when it is valid)."""
    teacher = cfg.distill.teacher
    if not isinstance(teacher, ModelConfig):  # None, or from_checkpoint not yet resolved
        teacher = None  # (models/teacher_config.resolve_teacher runs before these checks)
    errs = range_errors(cfg)  # single fields: bounds and choices (config/ranges.py)
    errs += _model_checks(cfg.model, "model", cfg, check_split=teacher is None)
    if teacher is not None:
        errs += _model_checks(teacher, "distill.teacher", cfg, check_split=False)
        errs += pair_pipeline_split_errors(cfg.model, teacher,
                                           cfg.parallel.pipeline_model_parallel_size)
    errs += _parallel_checks(cfg, world_size)
    errs += _train_checks(cfg)
    errs += _distill_checks(cfg)
    return errs


def static_checks(cfg: RunConfig, world_size: Optional[int] = None) -> RunConfig:
    """Raise ConfigError listing every static problem; return cfg when it is valid."""
    errs = static_errors(cfg, world_size)
    if errs:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errs))
    return cfg
