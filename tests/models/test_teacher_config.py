"""distill.teacher: from_checkpoint — the loader's default, the resolution from megatron_ddk.json,
the comparison of an explicit teacher, and its place before the static checks (check-config)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from megatron_ddk.config import ConfigError, ModelConfig, load_config, to_dict
from megatron_ddk.models.checkpoint_layout import LATEST_FILE, META_FILE
from megatron_ddk.models.teacher_config import resolve_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECORDED = ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=96, normalization="LayerNorm", rotary_base=500000,
                       norm_epsilon=1e-6, max_position_embeddings=128, padded_vocab_size=640,
                       transformer_impl="transformer_engine", fp8="e4m3",
                       recompute_granularity="full", num_layers_in_first_pipeline_stage=1,
                       num_layers_in_last_pipeline_stage=2, hidden_dropout=0.1)


def _checkpoint(tmp_path, model: dict = None) -> str:
    """A checkpoint root whose iter_0000005 records `model` (as megatron-ddk writes it)."""
    root = tmp_path / "teacher_ckpt"
    folder = root / "iter_0000005"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    if model is not None:
        (folder / META_FILE).write_text(json.dumps({"model": model, "padded_vocab_size": 640,
                                                    "kind": "training", "iteration": 5}))
    (root / LATEST_FILE).write_text("5")
    return str(root)


def test_loader_defaults_teacher_to_from_checkpoint_only_when_not_given(tmp_path):
    ckpt = _checkpoint(tmp_path, to_dict(RECORDED))
    assert load_config(None, [f"distill.teacher_load={ckpt}"]).distill.teacher == "from_checkpoint"
    assert load_config(None, [f"distill.teacher_load={ckpt}", "distill.teacher=null"]
                       ).distill.teacher is None  # explicit null: no teacher
    assert load_config(None, []).distill.teacher is None  # CPT: neither given
    cfg = load_config(None, [f"distill.teacher_load={ckpt}", "distill.teacher.num_layers=3"])
    assert isinstance(cfg.distill.teacher, ModelConfig)


def test_error_inside_teacher_keeps_the_dotted_field(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key distill\.teacher\.num_layerz"):
        load_config(None, ["distill.teacher.num_layerz=2"])
    with pytest.raises(ConfigError, match=r"distill\.teacher\.hidden_size: got 'wide'"):
        load_config(None, ["distill.teacher.hidden_size=wide"])
    with pytest.raises(ConfigError, match=r"distill\.teacher: got 'from_ckpt'.*from_checkpoint"):
        load_config(None, ["distill.teacher=from_ckpt"])


def test_from_checkpoint_takes_what_the_weights_compute(tmp_path):
    ckpt = _checkpoint(tmp_path, to_dict(RECORDED))
    cfg = resolve_teacher(load_config(None, [f"distill.teacher_load={ckpt}"]))
    t = cfg.distill.teacher
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "normalization", "rotary_base", "norm_epsilon",
                 "max_position_embeddings", "padded_vocab_size"):
        assert getattr(t, name) == getattr(RECORDED, name), name
    # how this run executes it is not the checkpoint's business
    assert t.transformer_impl == cfg.model.transformer_impl == "local"
    assert (t.fp8, t.recompute_granularity, t.num_layers_in_first_pipeline_stage,
            t.num_layers_in_last_pipeline_stage, t.hidden_dropout) == (None, None, None, None, 0.0)


def test_explicit_teacher_that_disagrees_names_every_field(tmp_path):
    ckpt = _checkpoint(tmp_path, to_dict(RECORDED))
    explicit = {k: v for k, v in to_dict(RECORDED).items() if v is not None}
    explicit.update(hidden_size=64, rotary_base=10000, transformer_impl="local")
    del explicit["fp8"]
    overrides = [f"distill.teacher_load={ckpt}"] + [f"distill.teacher.{k}={v}"
                                                     for k, v in explicit.items()]
    with pytest.raises(ConfigError) as err:
        resolve_teacher(load_config(None, overrides))
    msg = str(err.value)
    assert "distill.teacher disagrees with the teacher's checkpoint" in msg
    assert os.path.join(ckpt, "iter_0000005", META_FILE) in msg
    assert "hidden_size: checkpoint 48 vs config 64" in msg
    assert "rotary_base: checkpoint 500000 vs config 10000" in msg
    assert "on 3 field(s)" in msg and "kv_channels: checkpoint 12 vs config 16" in msg
    assert "fp8" not in msg and "transformer_impl" not in msg  # execution settings are free


def test_explicit_teacher_that_agrees_is_kept(tmp_path):
    ckpt = _checkpoint(tmp_path, to_dict(RECORDED))
    overrides = [f"distill.teacher_load={ckpt}", "distill.teacher.num_layers=3",
                 "distill.teacher.hidden_size=48", "distill.teacher.num_attention_heads=4",
                 "distill.teacher.num_query_groups=2", "distill.teacher.ffn_hidden_size=96",
                 "distill.teacher.kv_channels=12",  # = 48 / 4, what None means
                 "distill.teacher.normalization=LayerNorm", "distill.teacher.rotary_base=500000",
                 "distill.teacher.norm_epsilon=1e-6",
                 "distill.teacher.num_layers_in_first_pipeline_stage=2"]
    cfg = resolve_teacher(load_config(None, overrides))
    assert cfg.distill.teacher.num_layers_in_first_pipeline_stage == 2


def test_from_checkpoint_needs_a_recorded_model_and_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="from_checkpoint needs distill.teacher_load"):
        resolve_teacher(load_config(None, ["distill.teacher=from_checkpoint"]))
    with pytest.raises(ConfigError, match="distill.teacher_load cannot be read.*does not exist"):
        resolve_teacher(load_config(None, [f"distill.teacher_load={tmp_path}/nowhere"]))
    bare = _checkpoint(tmp_path / "mlm", None)  # a Megatron-LM checkpoint: no megatron_ddk.json
    with pytest.raises(ConfigError, match="records no model"):
        resolve_teacher(load_config(None, [f"distill.teacher_load={bare}"]))


def test_check_config_resolves_the_teacher_before_the_pipeline_split_rule(tmp_path):
    """The recorded 3-layer teacher cannot share PP=2 stages with an even split: the static
    pair rule can only say so once the teacher's shape is known."""
    ckpt = _checkpoint(tmp_path, to_dict(RECORDED))
    run = {"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                     "max_position_embeddings": 64},
           "parallel": {"pipeline_model_parallel_size": 2},
           "data": {"seq_length": 32},
           "distill": {"teacher_load": ckpt},
           "ddk": {"policy": "ddk", "interval": 4},
           "train": {"train_iters": 8, "lr_warmup_iters": 2}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_ddk.cli", "check-config", "--config",
                           str(path)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "distill.teacher.num_layers=3 cannot be split over 2" in proc.stderr
    run["distill"]["teacher"] = None  # explicit null: CPT, the pair rule does not apply
    run["ddk"]["policy"] = "static"
    path.write_text(yaml.safe_dump(run))
    proc = subprocess.run([sys.executable, "-m", "megatron_ddk.cli", "check-config", "--config",
                           str(path)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
