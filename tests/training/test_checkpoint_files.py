"""Checkpoint folders as they are found on disk (one world-1 launch, real dist_checkpointing):

- Megatron-LM's own layouts (iter_N and release, no megatron_ddk.json) load as a teacher with
  the architecture from the config: the weights equal the model that was saved;
- a damaged folder (truncated shard, corrupt common.pt / .metadata / megatron_ddk.json) is
  refused with a message naming the file and the cause;
- a save that cannot write all its bytes (a file-size limit: the same short write a full disk
  gives, which torch reports as "unexpected pos") names the folder and the cause.
"""

import os
import re
import resource
import shutil
import signal

import pytest
import torch

from megatron_ddk.testing import run_distributed

VOCAB, SEQ = 256, 16
TEACHER = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
               ffn_hidden_size=64, max_position_embeddings=SEQ)


def _megatron_lm_save(model, folder, iteration):
    """What Megatron-LM's torch_dist save writes: the sharded model plus common entries."""
    from megatron.core import dist_checkpointing

    os.makedirs(folder)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": iteration,
                             "checkpoint_version": 3.0}, folder)


def _load_error(fn):
    from megatron_ddk.models.checkpoint import CheckpointError

    try:
        fn()
        return "loaded"
    except CheckpointError as exc:
        return str(exc)


def _damage(src, dst, name, how):
    shutil.copytree(src, dst)
    path = os.path.join(dst, name)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"\x80\x04garbage, not what was written")
    return dst


def _checks(rank, world, root):
    from megatron_ddk.config import ModelConfig
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model, save_model
    from megatron_ddk.models.teacher import build_teacher
    from megatron_ddk.parallel import destroy, initialize

    ctx = initialize(seed=5)
    cfg = ModelConfig(**TEACHER)
    source = build_gpt_model(cfg, ctx, VOCAB)
    reference = {k: v.clone() for k, v in source.state_dict().items() if torch.is_tensor(v)}
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(SEQ).expand(2, SEQ)
    source.eval()
    with torch.no_grad():
        ref_logits = source(tokens, pos, None)
    out = {}

    # Megatron-LM layouts: DIR/iter_0000007 + latest "7", and DIR/release + latest "release"
    for name, sub, latest in (("iter", "iter_0000007", "7"), ("release", "release", "release")):
        ckpt = os.path.join(root, f"mlm_{name}")
        _megatron_lm_save(source, os.path.join(ckpt, sub), 7)
        with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(latest)
        for path in (ckpt, os.path.join(ckpt, sub)):  # the root, or the folder itself
            torch.manual_seed(99)  # a teacher initialised differently before loading
            teacher = build_teacher(cfg, ctx, VOCAB, path)
            state = teacher.state_dict()
            same = all(torch.equal(state[k], v) for k, v in reference.items())
            with torch.no_grad():
                logits = teacher(tokens, pos, None)
            out[f"{name}:{os.path.basename(path)}"] = (same, torch.equal(logits, ref_logits),
                                                       teacher.training)
    # damaged megatron-ddk checkpoints
    good = save_model(os.path.join(root, "good"), 3, source, {"padded_vocab_size": VOCAB})
    shard = sorted(n for n in os.listdir(good) if n.endswith(".distcp"))[0]
    for name, how in ((shard, "truncate"), ("common.pt", "garbage"), (".metadata", "garbage"),
                      ("megatron_ddk.json", "garbage"), ("metadata.json", "garbage")):
        folder = _damage(good, os.path.join(root, f"bad_{name.strip('.')}"), name, how)
        out[f"damaged:{name}"] = _load_error(lambda folder=folder: load_model(
            folder, build_gpt_model(cfg, ctx, VOCAB)))
    # a save that cannot write its bytes (RLIMIT_FSIZE: the short write of a full disk)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        out["full"] = _load_error(lambda: save_model(os.path.join(root, "full"), 1, source, {}))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    out["full_published"] = os.path.exists(os.path.join(root, "full",
                                                        "latest_checkpointed_iteration.txt"))
    destroy()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_files"))
    return run_distributed(_checks, 1, root, timeout=400)[0], root


@pytest.mark.parametrize("key", ["iter:mlm_iter", "iter:iter_0000007", "release:mlm_release",
                                 "release:release"])
def test_megatron_lm_checkpoint_loads_as_teacher(results, key):
    weights_equal, logits_equal, training = results[0][key]
    assert weights_equal and logits_equal and not training


def test_megatron_lm_checkpoint_needs_an_explicit_teacher(results):
    from megatron_ddk.config import ConfigError, load_config
    from megatron_ddk.models.teacher_config import resolve_teacher

    ckpt = os.path.join(results[1], "mlm_iter")
    cfg = load_config(None, [f"distill.teacher_load={ckpt}"])  # teacher not given
    assert cfg.distill.teacher == "from_checkpoint"
    with pytest.raises(ConfigError, match="records no model.*give the teacher's architecture"):
        resolve_teacher(cfg)
    explicit = load_config(None, [f"distill.teacher_load={ckpt}"] +
                           [f"distill.teacher.{k}={v}" for k, v in TEACHER.items()])
    assert resolve_teacher(explicit).distill.teacher.hidden_size == 32


@pytest.mark.parametrize("name, expected", [
    ("shard", r"__0_\d\.distcp is truncated: \d+ bytes, but .*\.metadata places data up to byte"),
    ("common.pt", r"bad_common\.pt/common\.pt is corrupt \(UnpicklingError"),
    (".metadata", r"bad_metadata/\.metadata is corrupt"),
    ("megatron_ddk.json", r"bad_megatron_ddk\.json/megatron_ddk\.json cannot be read "
                          r"\((JSON|Unicode)DecodeError"),
    ("metadata.json", r"bad_metadata\.json/metadata\.json"),
])
def test_damaged_checkpoint_names_the_file(results, name, expected):
    out = results[0]
    key = next(k for k in out if k.startswith("damaged:") and
               (k.endswith(".distcp") if name == "shard" else k == f"damaged:{name}"))
    assert out[key] != "loaded"
    assert re.search(expected, out[key]), out[key]


def test_failed_save_names_folder_and_cause(results):
    msg = results[0]["full"]
    assert "saving checkpoint iteration 1 to" in msg and "full/iter_0000001.tmp" in msg
    assert "unexpected pos" in msg and "disk is full or a quota or file-size limit" in msg
    assert "free on that device" in msg
    assert not results[0]["full_published"]  # nothing named as a checkpoint


@pytest.mark.parametrize("how", ["remove", "truncate"])
def test_unreadable_index_is_refused_before_torch_reads_it(results, tmp_path, capfd, how):
    """A missing or truncated .metadata is named before torch's reader runs (which logged a
    traceback of its own before the clear message)."""
    from megatron_ddk.models.checkpoint import CheckpointError, load_sharded

    folder = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(results[1], "good", "iter_0000003"), folder)
    index = os.path.join(folder, ".metadata")
    if how == "remove":
        os.remove(index)
    else:
        with open(index, "r+b") as f:
            f.truncate(os.path.getsize(index) // 2)
    with pytest.raises(CheckpointError) as err:
        load_sharded(folder, {})
    assert f"{index} is {'missing' if how == 'remove' else 'corrupt'}" in str(err.value)
    out, errout = capfd.readouterr()
    assert "Traceback" not in out + errout


@pytest.mark.parametrize("meta, field", [({"model": "not a mapping"}, "model"),
                                         ({"padded_vocab_size": "x"}, "padded_vocab_size"),
                                         ({"iteration": [3]}, "iteration"),
                                         ({"tokenizer_hash": 7}, "tokenizer_hash")])
def test_megatron_ddk_json_with_wrong_types_names_the_entry(tmp_path, meta, field):
    import json

    from megatron_ddk.models.checkpoint_layout import CheckpointError, read_metadata

    (tmp_path / "megatron_ddk.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"megatron_ddk\.json: {field} is .*, expected"):
        read_metadata(str(tmp_path))
