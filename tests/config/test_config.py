"""Config: YAML round trip, overrides, strict keys, and one test per validation message."""

import dataclasses

import pytest
import yaml

from megatron_ddk.config import (
    ConfigError,
    config_to_yaml,
    dump_config,
    load_config,
    static_checks,
    static_errors,
    train_iters,
)
from megatron_ddk.config.host import host_errors


def _valid(**over):
    cfg = load_config(None, ["train.train_iters=100", "train.lr_warmup_iters=10",
                             "ddk.policy=static"] + [
        f"{k}={v}" for k, v in over.items()])
    return cfg


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = _valid()
    static_checks(cfg)
    path = tmp_path / "run.yaml"
    dump_config(cfg, str(path))
    again = load_config(str(path))
    assert again == cfg
    assert yaml.safe_load(config_to_yaml(cfg))["train"]["train_iters"] == 100


def test_every_field_has_a_docstring():
    import inspect

    from megatron_ddk.config import schema

    for cls in (schema.ModelConfig, schema.ParallelConfig, schema.DataConfig, schema.DistillConfig,
                schema.DDKConfig, schema.TrainConfig, schema.CheckpointConfig,
                schema.LoggingConfig, schema.RunConfig):
        src = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            after = src.split(f"\n    {f.name}:", 1)[1].split("\n", 2)
            assert after[1].strip().startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"


def test_overrides_nested_and_typed():
    cfg = load_config(None, ["train.lr=1e-4", "model.num_query_groups=2",
                             "distill.teacher.num_layers=6", "ddk.static_weights=[1, 2, 3]",
                             "checkpoint.save=null"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.num_query_groups == 2
    assert cfg.distill.teacher.num_layers == 6 and cfg.distill.teacher.hidden_size == 128
    assert cfg.ddk.static_weights == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("override, message", [
    (["model.foo=1"], "unknown key model.foo"),
    (["nosuch.x=1"], "unknown key nosuch"),
    (["model.normalization=BatchNorm"],
     "model.normalization: got 'BatchNorm'; allowed values: 'RMSNorm', 'LayerNorm'"),
    (["train.micro_batch_size=two"], "train.micro_batch_size: got 'two'; expected int"),
    (["train.lr"], "expected section.field=value"),
    (["lr=3"], "must be section.field"),
])
def test_schema_errors_name_field_and_value(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, override)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))


CASES = [
    ({"parallel.virtual_pipeline_model_parallel_size": 2},
     "interleaved (virtual) pipeline stages are not supported"),
    ({"parallel.context_parallel_size": 2}, "context parallelism is not supported"),
    ({"parallel.tensor_model_parallel_size": 3},
     "num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    ({"model.num_query_groups": 3}, "num_query_groups=3 must divide num_attention_heads=4"),
    ({"model.hidden_size": 130}, "hidden_size=130 is not divisible by num_attention_heads=4"),
    ({"data.seq_length": 8192}, "data.seq_length=8192 exceeds model.max_position_embeddings=4096"),
    ({"model.fp8": "e4m3"}, "model.fp8='e4m3' needs model.transformer_impl='transformer_engine'"),
    ({"parallel.sequence_parallel": True}, "sequence_parallel=true needs model.transformer_impl"),
    ({"parallel.pipeline_model_parallel_size": 3},
     "model.num_layers=2 cannot be split over parallel.pipeline_model_parallel_size=3"),
    ({"model.num_layers_in_first_pipeline_stage": 1},
     "need parallel.pipeline_model_parallel_size > 1"),
    ({"train.global_batch_size": 7},
     "global_batch_size=7 is not divisible by train.micro_batch_size=2"),
    ({"train.train_tokens": 1000}, "set exactly one of them"),
    ({"train.lr_warmup_iters": 100},
     "lr_warmup_iters=100 must be smaller than the decay length 100"),
    ({"train.min_lr": 1.0}, "need 0 <= min_lr <= lr"),
    ({"train.clip_grad": -1}, "clip_grad=-1.0: must be >= 0"),
    ({"distill.teacher": {"num_layers": 2}}, "distill.teacher_load is empty"),
    ({"distill.temperature": 0}, "distill.temperature=0.0: must be > 0"),
    ({"distill.gamma": -1}, "distill.gamma=-1.0: must be >= 0"),
    ({"ddk.policy": "ddk", "ddk.interval": 0}, "ddk.interval=0: must be >= 1"),
    ({"ddk.alpha": 1.5}, "ddk.alpha=1.5: must be in [0, 1]"),
    ({"ddk.policy": "ddk"}, "ddk.policy='ddk' needs a teacher"),
    ({"ddk.static_weights": [-1, 2]}, "static_weights=[-1.0, 2.0]: must be weights >= 0"),
    ({"ddk.weight_floor": 0.5, "ddk.weight_cap": 0.2},
     "weight_floor=0.5 is above ddk.weight_cap=0.2"),
    ({"ddk.max_epochs_per_domain": 0}, "max_epochs_per_domain=0.0: must be > 0"),
    ({"checkpoint.keep_last": 0}, "checkpoint.keep_last=0: must be >= 1"),
    ({"logging.log_interval": 0}, "logging.log_interval=0: must be >= 1"),
]


@pytest.mark.parametrize("over, message", CASES)
def test_static_check_messages(over, message):
    base = {"ddk.policy": "static"}
    base.update(over)
    cfg = load_config(None, ["train.train_iters=100", "train.lr_warmup_iters=10",
                             "ddk.policy=static"] + [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in base.items()])
    with pytest.raises(ConfigError) as err:
        static_checks(cfg)
    assert message in str(err.value)


def test_world_size_batch_check():
    cfg = _valid(**{"ddk.policy": "static", "train.global_batch_size": 8,
                    "train.micro_batch_size": 2})
    assert static_errors(cfg, world_size=4) == []
    assert "data-parallel size 3" in static_errors(cfg, world_size=3)[0]
    cfg.parallel.tensor_model_parallel_size = 2
    assert ("not divisible by tensor x pipeline parallel size 2"
            in static_errors(cfg, world_size=3)[0])


def test_pipeline_split_with_first_and_last_stage():
    cfg = _valid(**{"ddk.policy": "static", "model.num_layers": 5,
                    "parallel.pipeline_model_parallel_size": 3,
                    "model.num_layers_in_first_pipeline_stage": 1,
                    "model.num_layers_in_last_pipeline_stage": 2})
    assert static_errors(cfg) == []


def test_train_tokens_to_iters():
    cfg = load_config(None, ["train.train_tokens=10000", "data.seq_length=100",
                             "train.global_batch_size=8"])
    assert train_iters(cfg) == 13  # ceil(10000 / 800)


def test_host_checks_refuse_te_and_fp8_on_cpu():
    cfg = _valid(**{"model.transformer_impl": "transformer_engine", "model.fp8": "hybrid",
                    "train.bf16": True})
    errs = " | ".join(host_errors(cfg))
    assert "Transformer Engine is not importable" in errs
    assert "needs a CUDA GPU" in errs
    assert "model.fp8='hybrid' needs an FP8-capable GPU" in errs
    assert "train.bf16" not in errs  # bf16 runs on CPU (tests/training/test_bf16.py)


def test_configuration_reference_is_up_to_date():
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "tools/config_reference.py", "--check",
                           "docs/configuration.md"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
