"""Real runs against their checkpoint folders (tiny sizes, CPU, one process each):

- a KD run with only distill.teacher_load takes the teacher's architecture from its checkpoint;
- re-running it without --load is refused and leaves the folder as it was; checkpoint.load: auto
  resumes it, keeping the run id, and keep_last prunes only that run's iterations;
- with checkpoint.overwrite a run may save into a folder holding another model's checkpoints,
  and never prunes them;
- check-config --deep finds the Qwen-1.5 14B preset's mismatches with a tiny manifest and a tiny
  teacher before any model is built.
"""

import json
import os
import shutil

import pytest
import yaml

from megatron_ddk.models.checkpoint_layout import complete_iterations, read_latest_iteration
from megatron_ddk.testing import tiny_run

ROOT = tiny_run.ROOT


def _meta(ckpt, it):
    with open(os.path.join(ckpt, f"iter_{it:07d}", "megatron_ddk.json")) as f:
        return json.load(f)


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "step"]


def test_teacher_from_checkpoint_rerun_refused_then_auto_resume(tiny, tmp_path):
    run_dir = str(tmp_path / "kd")
    cfg = tiny_run.run_config(tiny["manifest"], run_dir, teacher_load=tiny["teacher"],
                              policy="static", train_iters=2, interval=2,
                              extra={"train": {"lr_warmup_iters": 1, "lr_decay_iters": 4}})
    del cfg["distill"]["teacher"]  # the architecture comes from the teacher's checkpoint
    cfg["checkpoint"].update(save_interval=1, keep_last=1)
    path = tiny_run.write_config(cfg, os.path.join(run_dir, "run.yaml"))
    ckpt = cfg["checkpoint"]["save"]
    tiny_run.train(path)
    assert complete_iterations(ckpt) == [2] and read_latest_iteration(ckpt) == 2
    with open(os.path.join(ckpt, "iter_0000002", "run_config.yaml")) as f:
        teacher = yaml.safe_load(f)["distill"]["teacher"]
    assert {k: teacher[k] for k in tiny_run.TEACHER} == tiny_run.TEACHER
    assert all(r["kd_loss"] > 0 for r in _steps(run_dir))  # the teacher was used
    first_id = _meta(ckpt, 2)["run_id"]
    stamp = os.path.getmtime(os.path.join(ckpt, "iter_0000002", "megatron_ddk.json"))

    with pytest.raises(RuntimeError) as err:  # the same config again, without --load
        tiny_run.train(path)
    msg = str(err.value)
    assert "exited 2" in msg and f"checkpoint.save={ckpt} already holds checkpoints" in msg
    assert f"--load {ckpt}" in msg and "checkpoint.overwrite=true" in msg
    assert read_latest_iteration(ckpt) == 2 and complete_iterations(ckpt) == [2]
    assert os.path.getmtime(os.path.join(ckpt, "iter_0000002", "megatron_ddk.json")) == stamp

    out = tiny_run.train(path, overrides=["checkpoint.load=auto", "train.train_iters=4"])
    assert "resumed from" in out and "iter_0000002" in out
    assert read_latest_iteration(ckpt) == 4 and complete_iterations(ckpt) == [4]
    assert _meta(ckpt, 4)["run_id"] == first_id  # one run, resumed


def test_overwrite_keeps_another_models_checkpoints(tiny, tmp_path):
    ckpt = str(tmp_path / "shared_ckpt")
    shutil.copytree(tiny["teacher"], ckpt)  # the teacher's checkpoints (iteration 20)
    run_dir = str(tmp_path / "cpt")
    cfg = tiny_run.run_config(tiny["manifest"], run_dir, policy="static", train_iters=2,
                              interval=2, extra={"train": {"lr_warmup_iters": 1}})
    cfg["checkpoint"].update(save=ckpt, save_interval=1, keep_last=1, overwrite=True)
    tiny_run.train(tiny_run.write_config(cfg, os.path.join(run_dir, "run.yaml")))
    assert complete_iterations(ckpt) == [2, 20]  # its own iteration 1 pruned, never the teacher's
    assert read_latest_iteration(ckpt) == 2
    assert _meta(ckpt, 20)["model"]["hidden_size"] == tiny_run.TEACHER["hidden_size"]


def test_deep_check_of_a_14b_preset_against_tiny_files(tiny, tmp_path):
    from megatron_ddk.config import load_config
    from megatron_ddk.training.deep_check import deep_errors

    other_tok = str(tmp_path / "other_tokenizer_teacher")
    shutil.copytree(tiny["teacher"], other_tok)
    meta_path = os.path.join(other_tok, "iter_0000020", "megatron_ddk.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta.update(tokenizer_hash="sha256:" + "0" * 64, vocab_size=2000)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    cfg = load_config(os.path.join(ROOT, "examples/presets/qwen1.5_14b_to_1.8b.yaml"),
                      [f"data.manifest={tiny['manifest']}", f"distill.teacher_load={other_tok}",
                       f"checkpoint.save={tmp_path / 'save'}"])
    errs = "\n".join(deep_errors(cfg, 32))
    assert "distill.teacher disagrees with the teacher's checkpoint" in errs
    assert "num_layers: checkpoint 2 vs config 40" in errs and \
        "hidden_size: checkpoint 64 vs config 5120" in errs
    assert "model.padded_vocab_size=151936 is more than twice the 512 entries" in errs
    assert f"distill.teacher_load={other_tok} was trained with tokenizer sha256:000" in errs
    assert "has a 2000-entry tokenizer vocabulary but data.manifest's tokenizer has 512" in errs
    assert "has 512 embedding rows but this run builds its models with 152064" in errs
    assert "checkpoint.load: checkpoint /path/to/checkpoints/qwen1.5-1.8b-megatron does not " \
           "exist" in errs

    good = tiny_run.run_config(tiny["manifest"], str(tmp_path / "good"),
                               teacher_load=tiny["teacher"])
    del good["distill"]["teacher"]
    path = tiny_run.write_config(good, str(tmp_path / "good.yaml"))
    assert deep_errors(load_config(path)) == []


def test_resume_from_a_checkpoint_past_train_iters_is_refused(tmp_path):
    """--load of a checkpoint at iteration 4 with train.train_iters=2 would save iteration 4
    again with the new config (it rewrote a finished checkpoint); == train_iters still resumes."""
    from megatron_ddk.config import ConfigError, load_config
    from megatron_ddk.training.run_folder import check_save_folder

    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000004").mkdir(parents=True)
    (ckpt / "iter_0000004" / "megatron_ddk.json").write_text(json.dumps({"iteration": 4}))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4")
    base = ["ddk.policy=static", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}"]
    with pytest.raises(ConfigError, match=r"is at iteration 4 .*past this run's last step "
                                          r"\(train.train_iters=2\).*above 4"):
        check_save_folder(load_config(None, base + ["train.train_iters=2"]))
    for ok in (["train.train_iters=4"], ["train.train_iters=9"],
               ["train.train_iters=2", "checkpoint.finetune=true", "checkpoint.overwrite=true"]):
        check_save_folder(load_config(None, base + ok))


def test_deep_check_compares_the_manifest_vocabulary_size_too(tiny, tmp_path):
    """A manifest whose tokenizer hash is right but vocab_size wrong is named by --deep (the
    datasets' own records, or the tokenizer's size, disagree)."""
    import yaml

    from megatron_ddk.config import load_config
    from megatron_ddk.training.deep_check import deep_errors

    folder = os.path.dirname(tiny["manifest"])
    raw = yaml.safe_load(open(tiny["manifest"]))
    raw["tokenizer"]["vocab_size"] = 600
    edited = os.path.join(folder, "manifest_vocab600.yaml")
    with open(edited, "w") as f:
        yaml.safe_dump(raw, f)
    cfg = tiny_run.run_config(edited, str(tmp_path / "run"), teacher_load=tiny["teacher"])
    del cfg["distill"]["teacher"]
    errs = "\n".join(deep_errors(load_config(tiny_run.write_config(cfg, str(tmp_path / "r.yaml")))))
    assert "data.manifest" in errs and "vocabulary 512" in errs and "600" in errs, errs
    for d in raw["domains"]:  # and without the datasets' records: the tokenizer's own size
        for key in ("train_prefixes", "valid_prefix", "test_prefix"):
            for p in (d[key] if isinstance(d[key], list) else [d[key]]):
                full = p if os.path.isabs(p) else os.path.join(folder, p)
                if os.path.exists(full + ".tokenizer.json"):
                    os.rename(full + ".tokenizer.json", full + ".tokenizer.json.off")
    try:
        errs = "\n".join(deep_errors(load_config(str(tmp_path / "r.yaml"))))
        assert "tokenizer.vocab_size is 600 but the tokenizer" in errs and "512 entries" in errs, \
            errs
    finally:
        for root, _, files in os.walk(folder):
            for n in files:
                if n.endswith(".tokenizer.json.off"):
                    os.rename(os.path.join(root, n), os.path.join(root, n[:-4]))
