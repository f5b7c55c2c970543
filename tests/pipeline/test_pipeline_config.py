"""Pipeline config and the checks that run before any stage: every shipped pipeline config
validates; bad input is a named error before anything is trained."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from megatron_ddk.config.loader import ConfigError
from megatron_ddk.pipeline.config import load_pipeline_config
from megatron_ddk.pipeline.plan import PipelinePlan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MY_DATA = os.path.join(ROOT, "examples", "my_data", "pipeline.yaml")
QUICKSTART = os.path.join(ROOT, "examples", "quickstart", "pipeline.yaml")


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.jsonl").write_text(json.dumps({"text": "hello " * 50}) + "\n")
    return str(folder)


@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_pipeline_configs_validate(tmp_path, smoke):
    for path, kw in ((MY_DATA, {"corpus": _corpus(tmp_path)}), (QUICKSTART, {})):
        cfg = load_pipeline_config(path, smoke=smoke, out=str(tmp_path / "out"), **kw)
        PipelinePlan(cfg).check()
        assert [a.name for a in cfg.arms] == ["CPT", "KD", "DDK"]


def test_quickstart_ddk_yaml_is_the_pipelines_ddk_arm():
    """examples/quickstart/ddk.yaml (the DDK arm by hand) trains what the pipeline's DDK arm
    trains: every setting in it equals the generated arm config's (paths aside)."""
    cfg = load_pipeline_config(QUICKSTART, out=os.path.join(ROOT, "runs", "quickstart"))
    plan = PipelinePlan(cfg)
    arm = next(a for a in cfg.arms if a.name == "DDK")
    generated = plan.arm_config(arm, cfg.seeds[0], resolve=False)
    by_hand = yaml.safe_load(open(os.path.join(ROOT, "examples", "quickstart", "ddk.yaml")))
    for section in ("model", "ddk", "train"):
        for key, value in by_hand[section].items():
            assert generated[section].get(key, value) == value, (section, key)
    assert generated["train"]["train_iters"] == by_hand["train"]["train_iters"]
    assert generated["train"]["global_batch_size"] == by_hand["train"]["global_batch_size"]
    assert generated["ddk"]["interval"] == by_hand["ddk"]["interval"]
    for key in ("gamma", "temperature"):
        assert generated["distill"][key] == by_hand["distill"][key]
    for key, value in by_hand["distill"]["teacher"].items():
        assert generated["distill"]["teacher"][key] == value, ("teacher", key)


def test_smoke_section_and_overrides_apply(tmp_path):
    cfg = load_pipeline_config(QUICKSTART, ["seeds=[1,2,3]", "tokenizer.vocab_size=1024"],
                               smoke=True, out=str(tmp_path))
    assert cfg.seeds == [1, 2, 3] and cfg.tokenizer.vocab_size == 1024
    assert cfg.teacher.run["train"]["train_iters"] == 20  # from smoke:
    assert cfg.teacher.run["train"]["lr"] == 2.0e-3       # kept from the main section


def test_missing_corpus_folder(tmp_path):
    cfg = load_pipeline_config(MY_DATA, corpus=str(tmp_path / "nope"), out=str(tmp_path))
    with pytest.raises(ConfigError, match=r"corpus folder .*nope does not exist.*--corpus"):
        PipelinePlan(cfg).check()


def test_arm_with_unknown_policy_is_named(tmp_path):
    cfg = load_pipeline_config(MY_DATA, corpus=_corpus(tmp_path), out=str(tmp_path))
    cfg.arms[2].run = {"ddk": {"policy": "dkk"}}
    with pytest.raises(ConfigError, match=r"arm DDK \(seed 1234\).*ddk.policy.*'dkk'.*'ddk'"):
        PipelinePlan(cfg).check()


def test_unknown_key_and_duplicate_arm(tmp_path):
    path = tmp_path / "p.yaml"
    base = yaml.safe_load(open(MY_DATA))
    path.write_text(yaml.safe_dump(dict(base, teachr={})))
    with pytest.raises(ConfigError, match="unknown key teachr"):
        load_pipeline_config(str(path), corpus=_corpus(tmp_path))
    path.write_text(yaml.safe_dump(dict(base, arms=[{"name": "KD"}, {"name": "KD"}])))
    with pytest.raises(ConfigError, match=r"duplicate name\(s\) \['KD'\]"):
        load_pipeline_config(str(path), corpus=str(tmp_path))


def test_arm_seed_equal_to_a_pretraining_seed_is_refused(tmp_path):
    cfg = load_pipeline_config(MY_DATA, ["seeds=[101]"], corpus=_corpus(tmp_path),
                               out=str(tmp_path))
    with pytest.raises(ConfigError, match=r"seeds \[101\] equal a pre-training stage"):
        PipelinePlan(cfg).check()


def _tokenizer(tmp_path, name, text):
    import sentencepiece as spm

    src = tmp_path / f"{name}.txt"
    src.write_text(text)
    spm.SentencePieceTrainer.train(input=str(src), model_prefix=str(tmp_path / name),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    return str(tmp_path / f"{name}.model")


def test_teacher_checkpoint_of_another_tokenizer(tmp_path):
    from megatron_ddk.data.tokenizer import tokenizer_hash

    ours = _tokenizer(tmp_path, "ours", "the quick brown fox jumps over the lazy dog\n" * 200)
    other = _tokenizer(tmp_path, "other", "lorem ipsum dolor sit amet consectetur\n" * 200)
    ckpt = tmp_path / "teacher"
    (ckpt / "iter_0000010").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    (ckpt / "iter_0000010" / "megatron_ddk.json").write_text(json.dumps(
        {"tokenizer_hash": tokenizer_hash(other), "model": {"num_layers": 2}}))
    cfg = load_pipeline_config(MY_DATA, ["teacher.source=checkpoint",
                                         f"teacher.checkpoint={ckpt}", "tokenizer.train=false",
                                         f"tokenizer.model={ours}"],
                               corpus=_corpus(tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"teacher.checkpoint .* trained with tokenizer "
                                          r"sha256:.* but the data use sha256:"):
        PipelinePlan(cfg).check()


def test_domain_too_small_fails_in_the_data_stage_with_numbers(tmp_path):
    argv = [sys.executable, "-m", "megatron_ddk.cli", "pipeline", "--config", MY_DATA,
            "--corpus", _corpus(tmp_path), "--out", str(tmp_path / "out"), "--smoke",
            "data.valid_samples=500"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "stage datasets failed" in err and "--valid-samples" in err, err[-2000:]
    assert not (tmp_path / "out" / "runs").exists()  # nothing was trained


def _hf_folder(tmp_path, name, arch="LlamaForCausalLM", tokenizer=None):
    """A Hugging Face model folder as the plan check reads it: config.json and a tokenizer."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 60, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}))
    if tokenizer:
        (folder / "tokenizer.model").write_bytes(open(tokenizer, "rb").read())
    return str(folder)


@pytest.mark.parametrize("case", ["trains_a_tokenizer", "other_tokenizer", "gpt2", "same"])
def test_hugging_face_teacher_is_checked_before_the_first_stage(tmp_path, case):
    ours = _tokenizer(tmp_path, "ours", "the quick brown fox jumps over the lazy dog\n" * 200)
    other = _tokenizer(tmp_path, "other", "lorem ipsum dolor sit amet consectetur\n" * 200)
    hf = _hf_folder(tmp_path, "teacher_hf", arch="GPT2LMHeadModel" if case == "gpt2" else
                    "LlamaForCausalLM", tokenizer=ours if case == "same" else other)
    tok = (["tokenizer.train=true"] if case == "trains_a_tokenizer" else
           ["tokenizer.train=false", f"tokenizer.model={ours}"])
    cfg = load_pipeline_config(MY_DATA, ["teacher.source=huggingface", f"teacher.hf_dir={hf}"]
                               + tok, corpus=_corpus(tmp_path), out=str(tmp_path / "out"))
    fix = rf"set tokenizer: \{{train: false, model: {hf}/tokenizer.model\}}"
    expected = {"trains_a_tokenizer": r"brings its own tokenizer .* tokenizer.train is true.*"
                + fix,
                "other_tokenizer": r"its tokenizer .* is not the pipeline's .*" + fix,
                "gpt2": r"architecture GPT2LMHeadModel is not supported"}
    if case == "same":
        PipelinePlan(cfg).check()
        assert not os.path.exists(tmp_path / "out" / "runs")  # nothing ran
        return
    with pytest.raises(ConfigError, match="teacher.hf_dir: " + ".*" + expected[case]):
        PipelinePlan(cfg).check()
    assert not os.path.exists(tmp_path / "out" / "data")  # before the first stage
