"""Every numeric config field is range-checked, and the error names the field.

The allowed values are written out here by hand (BAD / GOOD), independently of the tables in
megatron_ddk/config; a walk over the schema's dataclasses makes sure no numeric field is left
out (a new field must be added here, i.e. someone decided its range)."""

import dataclasses
import math
import typing

import pytest

from megatron_ddk.config import ModelConfig, RunConfig, schema, static_errors

NAN = math.nan
MODEL_BAD = {
    "num_layers": [0, -1], "hidden_size": [0], "num_attention_heads": [0],
    "num_query_groups": [0, -2], "ffn_hidden_size": [0], "kv_channels": [0],
    "norm_epsilon": [0.0, -1e-5, NAN], "rotary_base": [0, -1], "rotary_percent": [0.0, 1.5, NAN],
    "max_position_embeddings": [0], "vocab_size": [0], "make_vocab_size_divisible_by": [0, -128],
    "padded_vocab_size": [0], "hidden_dropout": [-0.1, 1.0, NAN],
    "attention_dropout": [-0.1, 1.0, NAN], "init_method_std": [0.0, -0.02, NAN],
    "recompute_num_layers": [0], "num_layers_in_first_pipeline_stage": [0, -1],
    "num_layers_in_last_pipeline_stage": [0], "fp8_amax_history_len": [0],
}
MODEL_GOOD = {
    "num_layers": [1, 12], "num_query_groups": [1, 2], "ffn_hidden_size": [1], "kv_channels": [16],
    "norm_epsilon": [1e-6], "rotary_base": [1_000_000], "rotary_percent": [0.5, 1.0],
    "vocab_size": [1000], "make_vocab_size_divisible_by": [1, 64], "padded_vocab_size": [1024],
    "hidden_dropout": [0.0, 0.1], "attention_dropout": [0.0, 0.5], "init_method_std": [0.006],
    "recompute_num_layers": [2], "fp8_amax_history_len": [16],
}
BAD = {
    "parallel.tensor_model_parallel_size": [0, -1], "parallel.pipeline_model_parallel_size": [0],
    "parallel.virtual_pipeline_model_parallel_size": [0, 2],
    "parallel.context_parallel_size": [0, 2], "parallel.distributed_timeout_minutes": [0, -5],
    "data.seq_length": [1, 0],
    "distill.gamma": [-0.1, NAN], "distill.temperature": [0.0, -1.0, NAN],
    "distill.kl_chunk_tokens": [0],
    "ddk.interval": [0, -1], "ddk.alpha": [-0.1, 1.1, NAN], "ddk.valid_samples_per_domain": [0],
    "ddk.weight_floor": [-0.1, 1.5, NAN], "ddk.weight_cap": [0.0, 1.5],
    "ddk.max_epochs_per_domain": [0.0, -1.0],
    "train.micro_batch_size": [0], "train.global_batch_size": [0, -8],
    "train.train_iters": [0, -1], "train.train_tokens": [0, -5],
    "train.lr": [0.0, -1e-4, NAN, math.inf], "train.min_lr": [-1e-6, NAN],
    "train.lr_warmup_init": [-0.1, NAN], "train.lr_warmup_iters": [-1],
    "train.lr_decay_iters": [0, -1], "train.weight_decay": [-0.1, NAN],
    "train.adam_beta1": [-0.1, 1.0, NAN], "train.adam_beta2": [1.0, 1.5],
    "train.adam_eps": [0.0, -1e-8, NAN], "train.clip_grad": [-1.0, NAN], "train.seed": [-1],
    "train.exit_duration_minutes": [0.0, -1.0, NAN], "train.exit_interval": [0, -1],
    "checkpoint.save_interval": [0, -1], "checkpoint.keep_last": [0],
    "logging.log_interval": [0, -1],
}
GOOD = {
    "parallel.distributed_timeout_minutes": [1, 30], "data.seq_length": [2, 128],
    "distill.gamma": [0.0, 0.5], "distill.temperature": [2.0],
    "distill.kl_chunk_tokens": [1, 64], "ddk.interval": [1], "ddk.alpha": [0.0, 1.0],
    "ddk.weight_floor": [0.0, 0.1], "ddk.weight_cap": [0.5, 1.0],
    "ddk.max_epochs_per_domain": [0.5, 3.0], "train.train_iters": [1500],
    "train.lr_warmup_init": [0.0, 1e-6], "train.lr_warmup_iters": [0],
    "train.lr_decay_iters": [1500], "train.weight_decay": [0.0], "train.adam_beta1": [0.0, 0.5],
    "train.adam_beta2": [0.999], "train.adam_eps": [1e-6], "train.clip_grad": [0.0],
    "train.seed": [0, 7], "train.exit_duration_minutes": [0.5, 60.0],
    "train.exit_interval": [1, 100], "checkpoint.save_interval": [1], "checkpoint.keep_last": [1],
    "logging.log_interval": [1],
}


def base(teacher=False):
    cfg = RunConfig()
    cfg.train.train_iters = 2000
    cfg.ddk.policy = "static"
    if teacher:
        cfg.distill.teacher = ModelConfig(hidden_size=256)
        cfg.distill.teacher_load = "/ckpt/teacher"
    return cfg


def numeric_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        args = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],))
                if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            yield from numeric_fields(args[0], f"{prefix}{f.name}.")
        elif any(a in (int, float) for a in args):
            yield prefix + f.name


def put(cfg, dotted, value):
    *path, name = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def test_every_numeric_field_has_a_range_here():
    fields = set(numeric_fields(schema.RunConfig))
    covered = set(BAD) | {f"model.{n}" for n in MODEL_BAD}
    assert fields - covered == set(), "numeric fields without a decided range"
    assert covered - fields == set(), "ranges for fields that do not exist"
    assert set(numeric_fields(ModelConfig)) == set(MODEL_BAD)  # distill.teacher uses these too


CASES = ([(k, v) for k, vs in BAD.items() for v in vs]
         + [(f"{s}.{k}", v) for s in ("model", "distill.teacher") for k, vs in MODEL_BAD.items()
            for v in vs])


@pytest.mark.parametrize("dotted, value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_out_of_range_is_refused_by_name(dotted, value):
    cfg = base(teacher=dotted.startswith("distill.teacher"))
    put(cfg, dotted, value)
    errs = static_errors(cfg)
    assert any(dotted in e for e in errs), (dotted, value, errs)


GOOD_CASES = ([(k, v) for k, vs in GOOD.items() for v in vs]
              + [(f"{s}.{k}", v) for s in ("model", "distill.teacher")
                 for k, vs in MODEL_GOOD.items() for v in vs])


@pytest.mark.parametrize("dotted, value", GOOD_CASES, ids=[f"{k}={v}" for k, v in GOOD_CASES])
def test_in_range_is_accepted(dotted, value):
    cfg = base(teacher=True)
    assert static_errors(cfg) == []
    put(cfg, dotted, value)
    assert static_errors(cfg) == []


def test_negative_exit_interval_message():
    cfg = base()
    cfg.train.exit_interval = -1
    cfg.model.init_method_std = 0.0
    errs = static_errors(cfg)
    assert "train.exit_interval=-1: must be >= 1" in errs
    assert "model.init_method_std=0.0: must be > 0" in errs


@pytest.mark.parametrize("dotted, value, message", [
    ("parallel.context_parallel_size", 2, "parallel.context_parallel_size=2: must be 1; context "
     "parallelism is not supported in this version"),
    ("parallel.virtual_pipeline_model_parallel_size", 2,
     "parallel.virtual_pipeline_model_parallel_size=2: must be null; interleaved"),
    ("train.clip_grad", -1.0, "train.clip_grad=-1.0: must be >= 0; 0 disables clipping"),
    ("ddk.static_weights", [1.0, NAN], "ddk.static_weights=[1.0, nan]: must be weights >= 0"),
    ("ddk.static_weights", [0.0, 0.0], "ddk.static_weights=[0.0, 0.0]: must be weights >= 0 "
     "with a positive sum"),
])
def test_choice_and_weights_messages_name_field_value_and_rule(dotted, value, message):
    cfg = base()
    put(cfg, dotted, value)
    assert any(e.startswith(message) for e in static_errors(cfg)), static_errors(cfg)


def test_single_field_errors_come_before_cross_field_ones():
    cfg = base()
    cfg.train.micro_batch_size = 0  # no "not divisible" message, no division by zero
    cfg.train.lr, cfg.train.min_lr = 1e-4, 1e-3
    errs = static_errors(cfg, world_size=2)
    assert errs == ["train.micro_batch_size=0: must be >= 1",
                    "train.lr=0.0001, train.min_lr=0.001: need 0 <= min_lr <= lr; lower min_lr "
                    "or raise lr"], errs
