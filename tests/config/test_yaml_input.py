"""Config files as users write them: a key given twice in one mapping is refused (PyYAML keeps
the last one silently), in run configs and pipeline configs; YAML merge keys still work."""

import pytest

from megatron_ddk.config import ConfigError, load_config
from megatron_ddk.config.loader import load_yaml
from megatron_ddk.pipeline.config import load_pipeline_config


def test_duplicate_key_in_a_run_config_names_file_key_and_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 2\n  hidden_size: 32\n  hidden_size: 48\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert str(path) in msg and "'hidden_size' is given twice" in msg and "lines 3 and 4" in msg


def test_duplicate_section_and_flow_mapping_duplicates():
    with pytest.raises(ConfigError, match="'train' is given twice"):
        load_yaml("train: {lr: 1.0}\nmodel: {}\ntrain: {seed: 3}\n")
    with pytest.raises(ConfigError, match="'lr' is given twice.*lines 1 and 1"):
        load_yaml("train: {lr: 1.0, lr: 2.0}\n")


def test_merge_keys_and_plain_yaml_still_load():
    data = load_yaml("base: &b {lr: 1.0, seed: 2}\ntrain:\n  <<: *b\n  lr: 3.0\n")
    assert data == {"base": {"lr": 1.0, "seed": 2}, "train": {"lr": 3.0, "seed": 2}}
    assert load_yaml("") is None and load_yaml("[1, 2]") == [1, 2]


def test_duplicate_key_in_a_pipeline_config(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("out: x\nseeds: [1]\nseeds: [2]\n")
    with pytest.raises(ConfigError, match=r"pipeline config .*pipeline\.yaml: key 'seeds' is "
                                          r"given twice .*lines 2 and 3"):
        load_pipeline_config(str(path))


def test_world_size_message_names_the_parallel_fields():
    from megatron_ddk.config import static_errors

    cfg = load_config(None, ["train.train_iters=10", "ddk.policy=static",
                             "parallel.tensor_model_parallel_size=2"])
    errs = static_errors(cfg, world_size=1)
    assert any("world size 1 is not divisible" in e and "parallel.tensor_model_parallel_size=2"
               in e and "parallel.pipeline_model_parallel_size=1" in e for e in errs), errs


@pytest.mark.parametrize("world, over, message", [
    (0, [], "world size 0: must be >= 1"),
    (2, ["train.micro_batch_size=0"], "train.micro_batch_size=0: must be >= 1"),
    (2, ["parallel.tensor_model_parallel_size=0"], "tensor_model_parallel_size=0: must be >= 1"),
])
def test_world_size_checks_never_divide_by_zero(world, over, message):
    from megatron_ddk.config import static_errors

    cfg = load_config(None, ["train.train_iters=10", "ddk.policy=static"] + over)
    assert any(message in e for e in static_errors(cfg, world_size=world))


@pytest.mark.parametrize("over, message", [
    (["launch.nproc_per_node=0"], "launch.nproc_per_node=0: must be >= 1"),
    (["data.valid_samples=-1"], "data.valid_samples=-1: must be >= 1"),
    (["data.workers=0"], "data.workers=0: must be >= 1"),
    (["tokenizer.vocab_size=0"], "tokenizer.vocab_size=0: must be >= 1"),
    (["lm_eval.limit=0"], "lm_eval.limit=0: must be >= 1"),
    (["data.split_seq_length=1"], "data.split_seq_length=1: must be >= 2"),
    (["seeds=[-3]"], "seeds: -3 must be >= 0"),
    (["data.test_samples=0"], "data.test_samples=0 but evaluation.split is test"),
])
def test_pipeline_numbers_are_range_checked_by_name(tmp_path, over, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text("data: {corpus: somewhere}\narms: [{name: KD}]\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(str(path), over)
    assert message in str(err.value) and str(path) in str(err.value)
    load_pipeline_config(str(path), ["data.test_samples=0", "evaluation.split=valid"])


def test_pipeline_arm_error_names_the_arm_not_a_temporary_file(tmp_path):
    from megatron_ddk.pipeline.plan import PipelinePlan

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"out: {tmp_path}/out\ndata: {{corpus: {corpus}}}\n"
                    "teacher: {model: {num_layers: 2}}\nstudent: {model: {num_layers: 1}}\n"
                    "run: {train: {train_iters: 4, lr_warmup_iters: 1}}\n"
                    "arms: [{name: KD, run: {train: {lrr: 1.0}}}]\n")
    with pytest.raises(ConfigError) as err:
        PipelinePlan(load_pipeline_config(str(path))).check()
    msg = str(err.value)
    assert msg.startswith("arm KD (seed 1234): unknown key train.lrr"), msg
    assert "tmp" not in msg.split("unknown key")[0].replace("arm KD", "")
