"""Save-folder rules and run-scoped pruning on checkpoint folders laid out as megatron-ddk writes
them (training/run_folder.py, models/checkpoint_layout.py). The runs that produce such folders
are in test_checkpoint_safety.py; these cover every branch in milliseconds."""

import json
import os

import pytest

from megatron_ddk.config import ConfigError, load_config
from megatron_ddk.models.checkpoint_layout import (
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    complete_iterations,
    prune_checkpoints,
    resolve_checkpoint,
)
from megatron_ddk.training.run_folder import (
    check_save_folder,
    resolve_load,
    run_id,
    save_folder_errors,
)


def _iteration(root, it, run="run-a", model=None, latest=True, meta=True):
    folder = os.path.join(root, f"iter_{it:07d}")
    os.makedirs(folder)
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist"}, f)
    if meta:
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump({"run_id": run, "kind": "training", "iteration": it,
                       "model": model or {"hidden_size": 128, "num_layers": 2}}, f)
    if latest:
        with open(os.path.join(root, LATEST_FILE), "w") as f:
            f.write(str(it))
    return folder


def _cfg(save, *extra):
    return load_config(None, [f"checkpoint.save={save}", *extra])


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path):
    save = str(tmp_path / "ckpt")
    _iteration(save, 3)
    _iteration(save, 6)
    errs = save_folder_errors(_cfg(save))
    assert len(errs) == 1
    assert (f"checkpoint.save={save} already holds checkpoints: iterations [3, 6] (latest 6)"
            in errs[0])
    assert f"--load {save}" in errs[0] and "checkpoint.overwrite=true" in errs[0]
    assert "checkpoint.load=auto" in errs[0]
    with pytest.raises(ConfigError, match="refusing to write checkpoints"):
        check_save_folder(_cfg(save))
    assert save_folder_errors(_cfg(save, "checkpoint.overwrite=true")) == []
    assert save_folder_errors(_cfg(save, f"checkpoint.load={save}")) == []  # resume
    assert save_folder_errors(_cfg(save, f"checkpoint.load={save}/iter_0000003")) == []
    assert save_folder_errors(_cfg(str(tmp_path / "empty"))) == []


def test_iterations_without_latest_file_still_count(tmp_path):
    save = str(tmp_path / "ckpt")
    _iteration(save, 4, latest=False)  # e.g. killed between the rename and the latest file
    assert "iterations [4]" in save_folder_errors(_cfg(save))[0]
    os.makedirs(os.path.join(save, "iter_0000008.tmp"))  # an unfinished save is no checkpoint
    assert complete_iterations(save) == [4]


def test_another_models_or_the_teachers_folder(tmp_path):
    save = str(tmp_path / "ckpt")
    _iteration(save, 20, model={"hidden_size": 256, "num_layers": 4})
    other = str(tmp_path / "other")
    _iteration(other, 5)
    errs = save_folder_errors(_cfg(save, f"checkpoint.load={other}", "checkpoint.finetune=true"))
    assert "holds checkpoints of another model (num_layers: checkpoint 4 vs config 2; " \
           "hidden_size: checkpoint 256 vs config 128)" in errs[0]
    assert f"but this run loads {other}" in errs[0]
    # saving into the teacher's folder is refused even when resuming from it
    errs = save_folder_errors(_cfg(save, f"distill.teacher_load={save}/iter_0000020",
                                   f"checkpoint.load={save}"))
    assert "is the teacher's checkpoint folder" in errs[0]
    assert save_folder_errors(_cfg(save, f"distill.teacher_load={save}",
                                   "checkpoint.overwrite=true")) == []


def test_load_auto(tmp_path):
    save = str(tmp_path / "ckpt")
    assert resolve_load(_cfg(save, "checkpoint.load=auto")).checkpoint.load is None
    _iteration(save, 3)
    assert resolve_load(_cfg(save, "checkpoint.load=auto")).checkpoint.load == save
    with pytest.raises(ConfigError, match="checkpoint.load=auto resumes from checkpoint.save"):
        resolve_load(load_config(None, ["checkpoint.load=auto"]))


def test_run_id_is_kept_on_resume_only(tmp_path):
    save = str(tmp_path / "ckpt")
    _iteration(save, 3, run="abc")
    assert run_id(_cfg(save, f"checkpoint.load={save}")) == "abc"
    fresh = {run_id(_cfg(save, f"checkpoint.load={save}", "checkpoint.finetune=true")),
             run_id(_cfg(save))}
    assert "abc" not in fresh and len(fresh) == 2


def test_keep_last_prunes_only_this_runs_iterations(tmp_path):
    root = str(tmp_path / "ckpt")
    _iteration(root, 20, run="teacher")
    _iteration(root, 25, meta=False)  # a Megatron-LM iteration: no run id
    for it in (1, 2, 3):
        _iteration(root, it, run="mine")
    broken = _iteration(root, 4, run="mine", latest=False)
    with open(os.path.join(broken, META_FILE), "w") as f:
        f.write("{not json")
    assert prune_checkpoints(root, 1, "mine") == [1, 2]
    assert complete_iterations(root) == [3, 4, 20, 25]
    assert prune_checkpoints(root, 1, None) == []  # no run id: nothing is provably ours


def test_resolve_names_what_is_wrong(tmp_path):
    root = str(tmp_path / "ckpt")
    _iteration(root, 7, latest=False)
    with pytest.raises(CheckpointError, match=r"has no latest_checkpointed_iteration.txt \(it "
                                              r"holds iterations \[7\]"):
        resolve_checkpoint(root)
    with open(os.path.join(root, LATEST_FILE), "w") as f:
        f.write("seven")
    with pytest.raises(CheckpointError, match="expected an iteration number or 'release', "
                                              "found 'seven'"):
        resolve_checkpoint(root)
    with open(os.path.join(root, LATEST_FILE), "w") as f:
        f.write("9")
    with pytest.raises(CheckpointError, match="names iteration 9 but .*iter_0000009 is missing"):
        resolve_checkpoint(root)
    folder = os.path.join(root, "iter_0000007")
    assert resolve_checkpoint(folder) == (folder, 7) == resolve_checkpoint(folder)
