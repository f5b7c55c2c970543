"""Bad input to `megatron-ddk train` gets one clear message naming the problem and a non-zero
exit: missing manifest or dataset, tokenizer mismatch, TP not dividing the heads, NaN loss."""

import os
import shutil
import sys

import yaml

from megatron_ddk.testing import tiny_run
from megatron_ddk.testing.commands import run_command


def train_cli(cfg, tmp_path, *overrides):
    path = tiny_run.write_config(cfg, os.path.join(str(tmp_path), "run.yaml"))
    return run_command([sys.executable, "-m", "megatron_ddk.train", "--config", path,
                        *overrides], dict(os.environ, OMP_NUM_THREADS="1"), tiny_run.ROOT, 300)


def test_missing_manifest(tmp_path):
    cfg = tiny_run.run_config(str(tmp_path / "nope.yaml"), str(tmp_path), policy="static")
    code, out = train_cli(cfg, tmp_path)
    assert code == 2 and "nope.yaml" in out and "does not exist" in out


def test_missing_dataset(tiny, tmp_path):
    data = tmp_path / "datasets"
    shutil.copytree(os.path.dirname(tiny["manifest"]), data)
    manifest = yaml.safe_load(open(data / "manifest.yaml"))
    victim = manifest["domains"][1]["train_prefixes"][0]
    os.remove(os.path.join(str(data), victim + ".bin"))
    cfg = tiny_run.run_config(str(data / "manifest.yaml"), str(tmp_path / "run"), policy="static")
    code, out = train_cli(cfg, tmp_path)
    assert code == 2 and victim in out and ".bin" in out


def test_dataset_tokenizer_not_matching(tiny, tmp_path):
    data = tmp_path / "datasets"
    shutil.copytree(os.path.dirname(tiny["manifest"]), data)
    manifest = yaml.safe_load(open(data / "manifest.yaml"))
    tok = tmp_path / "other.model"
    shutil.copy(os.path.join(os.path.dirname(tiny["manifest"]), manifest["tokenizer"]["model"]),
                tok)
    with open(tok, "ab") as f:
        f.write(b"\0")  # a different tokenizer file than the data was made with
    manifest["tokenizer"]["model"] = str(tok)
    yaml.safe_dump(manifest, open(data / "manifest.yaml", "w"))
    cfg = tiny_run.run_config(str(data / "manifest.yaml"), str(tmp_path / "run"), policy="static")
    code, out = train_cli(cfg, tmp_path)
    assert code == 2 and "tokenizer" in out and "hash" in out


def test_tp_not_dividing_heads(tiny, tmp_path):
    cfg = tiny_run.run_config(tiny["manifest"], str(tmp_path), policy="static",
                              extra={"parallel": {"tensor_model_parallel_size": 3}})
    code, out = train_cli(cfg, tmp_path)
    assert code == 2
    assert ("model.num_attention_heads=4 is not divisible by "
            "parallel.tensor_model_parallel_size=3") in out


def test_nan_loss_stops_naming_step_and_domains(tiny, tmp_path):
    cfg = tiny_run.run_config(tiny["manifest"], str(tmp_path), policy="static", train_iters=30,
                              extra={"train": {"lr": 1.0e30, "min_lr": 1.0e30, "clip_grad": 0.0,
                                               "lr_warmup_iters": 0, "lr_decay_style": "constant"}})
    code, out = train_cli(cfg, tmp_path)
    assert code == 3, out[-2000:]
    line = [l for l in out.splitlines() if l.startswith("error: non-finite loss")][0]
    assert "at step" in line and "domain(s) [" in line
    assert any(name in line for name in ("c_headers", "english_prose", "licenses", "python_code"))
