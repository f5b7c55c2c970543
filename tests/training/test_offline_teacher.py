"""The offline teacher end to end (real processes): tools/cache_teacher_logits.py writes a store,
`distill.teacher_logits` runs read it.

References are independent of the store code: an online DDK run with the real teacher (a store
with K = the whole vocabulary in float32 must reproduce it: same per-step losses, same DDK
weights), an uninterrupted run (resume must be bit-exact), an uninterrupted producer (a killed
and restarted one must write the same bytes).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_ddk.testing import tiny_run

VOCAB = 512  # tiny_run.build_tiny_domains' tokenizer
COVER = 40  # samples per domain in the store; a 10-step run draws at most ~30 of a domain
STEPS, INTERVAL, GBS = 10, 2, 8
EXACT = ("loss", "lm_loss", "kd_loss", "lr", "grad_norm", "consumed_samples", "weights", "step")


def records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def write_run(tiny, run_dir, **extra):
    cfg = tiny_run.run_config(tiny["manifest"], str(run_dir), teacher_load=tiny["teacher"],
                              policy="ddk", train_iters=STEPS, interval=INTERVAL,
                              extra=extra or None)
    cfg["checkpoint"]["save_interval"] = 3
    return tiny_run.write_config(cfg, os.path.join(str(run_dir), "run.yaml"))


def cache_args(cfg_path, out, *extra):
    return ["tools/cache_teacher_logits.py", "--config", cfg_path, "--out", out, "--top-k",
            str(VOCAB), "--logprob-dtype", "float32", "--max-samples-per-domain", str(COVER),
            "--shard-samples", "8", *extra]


def failing(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable] + args, cwd=tiny_run.ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    cfg_path = write_run(tiny, root / "online")
    store = str(root / "store")
    tiny_run.run_tool(cache_args(cfg_path, store))
    tiny_run.train(cfg_path)  # the online reference
    return {"root": root, "cfg": cfg_path, "store": store, "online": str(root / "online")}


@pytest.fixture(scope="module")
def offline(setup):
    run_dir = setup["root"] / "offline"
    tiny_run.train(setup["cfg"], overrides=[f"distill.teacher_logits={setup['store']}",
                                           f"logging.run_dir={run_dir}",
                                           f"checkpoint.save={run_dir}/ckpt"])
    return str(run_dir)


def test_full_vocabulary_store_reproduces_online_ddk(setup, offline):
    on, off = records(setup["online"], "step"), records(offline, "step")
    assert [r["step"] for r in off] == list(range(1, STEPS + 1))
    for a, b in zip(on, off):
        for key in ("loss", "lm_loss", "kd_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        assert b["consumed_samples"] == a["consumed_samples"]
    ia, ib = records(setup["online"], "interval"), records(offline, "interval")
    assert [r["step"] for r in ib] == list(range(0, STEPS, INTERVAL))
    # ppl_T comes from the store's validation losses: the same numbers the online run measured
    assert ib[0]["loss_teacher"] == pytest.approx(ia[0]["loss_teacher"], rel=1e-6)
    for a, b in zip(ia, ib):
        assert b["weights"] == pytest.approx(a["weights"], rel=1e-5)
    weights = [tuple(r["weights"]) for r in ib]
    assert len(set(weights)) == len(weights), "DDK must move the weights every interval"


def test_offline_run_is_served_entirely_by_the_store(setup, offline):
    end = records(offline, "end")[-1]
    assert end["teacher_store_samples"] == STEPS * GBS  # every sample of every step
    timing = records(offline, "step")[-1]["timing"]
    assert timing["teacher_cache_read"] > 0 and "teacher_forward" not in timing
    meta = json.load(open(os.path.join(offline, "metadata.json")))
    log = open(os.path.join(offline, "train.log")).read()
    assert "teacher store" in log and "teacher loaded" not in log, "no teacher model is built"
    assert meta["tokenizer_hash"].startswith("sha256:")


def test_resume_with_a_store_is_bit_exact(setup, offline, tmp_path):
    run_dir = tmp_path / "resumed"
    common = [f"distill.teacher_logits={setup['store']}", f"logging.run_dir={run_dir}",
              f"checkpoint.save={run_dir}/ckpt"]
    tiny_run.train(setup["cfg"], overrides=common + ["train.exit_interval=6"])
    assert records(str(run_dir), "end")[-1]["step"] == 6
    tiny_run.train(setup["cfg"], overrides=common + ["--load", f"{run_dir}/ckpt"])
    a, b = records(offline, "step"), records(str(run_dir), "step")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in EXACT} == {k: rb[k] for k in EXACT}, ra["step"]


def test_missing_pair_is_a_named_error(setup, tmp_path):
    run_dir = tmp_path / "long"
    code, out = failing(["-m", "megatron_ddk.train", "--config", setup["cfg"],
                         f"distill.teacher_logits={setup['store']}", "train.train_iters=60",
                         f"logging.run_dir={run_dir}", f"checkpoint.save={run_dir}/ckpt"])
    assert code == 2, out
    line = [x for x in out.splitlines() if x.startswith("error:")][-1]
    assert "has no logits for domain" in line and "sample" in line, line
    assert "--max-samples-per-domain" in line and f"first {COVER} of the" in line, line


def test_wrong_header_is_a_named_error(setup, tiny, tmp_path):
    # another teacher (a copy of its checkpoint with one weight byte changed) and another T:
    # one launch, both fields named
    other = str(tmp_path / "other_teacher")
    shutil.copytree(tiny["teacher"], other)
    files = [os.path.join(d, f) for d, _, fs in os.walk(other) for f in fs if f.endswith(".distcp")]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, out = failing(["-m", "megatron_ddk.train", "--config", setup["cfg"],
                         f"distill.teacher_logits={setup['store']}",
                         f"distill.teacher_load={other}", "distill.temperature=2.0",
                         f"logging.run_dir={tmp_path}", f"checkpoint.save={tmp_path}/ckpt"])
    assert code == 2, out
    line = [x for x in out.splitlines() if x.startswith("error:")][-1]
    assert "does not match this run: teacher_fingerprint:" in line, line
    assert "another checkpoint" in line and "; temperature: store 1.0 vs run 2.0" in line, line


@pytest.mark.parametrize("field,value", [("seq_length", 16), ("seed", 7),
                                         ("tokenizer_hash", "sha256:" + "1" * 64),
                                         ("num_train_samples", [1, 2, 3, 4])])
def test_every_identity_field_is_checked(setup, field, value):
    from megatron_ddk.data.teacher_store import TeacherStore

    ident = json.load(open(os.path.join(setup["store"], "header.json")))["identity"]
    store = TeacherStore(setup["store"], ident["domains"])
    store.check_identity(dict(ident))  # the same run: no error
    with pytest.raises(ValueError, match=f"does not match this run: {field}: store "):
        store.check_identity(dict(ident, **{field: value}))


def test_reverse_kl_and_training_signal_are_refused_by_the_static_checks(setup, tmp_path):
    """What a store cannot serve is a static error: check-config names it before anything is
    built (the same checks train runs)."""
    from megatron_ddk import cli
    from megatron_ddk.config import RunConfig, static_errors

    cfg = RunConfig()
    cfg.distill.teacher_logits = setup["store"]
    cfg.distill.kl_direction = "reverse"
    assert any("reverse KL" in e and "top-K store" in e for e in static_errors(cfg))
    cfg.distill.kl_direction = "forward"
    cfg.ddk.signal = "training"
    assert any("ddk.signal='training'" in e for e in static_errors(cfg))
    path = str(tmp_path / "reverse.yaml")
    with open(path, "w") as f:
        f.write(f"distill: {{teacher_logits: {setup['store']}, kl_direction: reverse}}\n"
                f"logging: {{run_dir: {tmp_path / 'run'}}}\n")
    assert cli.main(["check-config", "--static", "--config", path]) == 2


def test_uncovered_sample_message_names_domain_sample_and_rebuild_size(setup):
    from megatron_ddk.data.mixture import domain_sample_order
    from megatron_ddk.data.teacher_store import TeacherStore

    header = json.load(open(os.path.join(setup["store"], "header.json")))
    ident = header["identity"]
    store = TeacherStore(setup["store"], ident["domains"])
    order = domain_sample_order(ident["seed"], 1, ident["num_train_samples"][1], 0)
    store.check_covered([(1, int(s)) for s in order[:COVER]])  # covered: no error
    with pytest.raises(ValueError) as err:
        store.check_covered([(1, int(order[COVER + 4]))])
    msg = str(err.value)
    assert f"domain {ident['domains'][1]!r} sample {int(order[COVER + 4])}" in msg
    assert f"--max-samples-per-domain {COVER + 5}" in msg


def test_interrupted_producer_resumes_to_the_same_store(setup, tmp_path):
    out = str(tmp_path / "store")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable] + cache_args(setup["cfg"], out), cwd=tiny_run.ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    shard = os.path.join(out, "c_headers", "shard_000002")
    deadline = time.time() + 300
    while not os.path.isdir(shard) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    header = json.load(open(os.path.join(out, "header.json")))
    assert header["complete"] is False, "killed before the end: the store is not complete"
    tiny_run.run_tool(cache_args(setup["cfg"], out))
    ref, got = json.load(open(os.path.join(setup["store"], "header.json"))), \
        json.load(open(os.path.join(out, "header.json")))
    assert got["complete"] and got["valid_losses"] == ref["valid_losses"]
    for name, info in ref["domains"].items():
        for j in range(info["num_shards"]):
            for arr in ("sample_ids", "checksums", "topk_ids", "topk_logprobs", "rest_logprob"):
                a = np.load(os.path.join(setup["store"], name, f"shard_{j:06d}", arr + ".npy"))
                b = np.load(os.path.join(out, name, f"shard_{j:06d}", arr + ".npy"))
                assert np.array_equal(a, b), (name, j, arr)
    leftovers = [p for name in ref["domains"] for p in os.listdir(os.path.join(out, name))
                 if re.search(r"\.tmp\d*$", p)]
    assert not leftovers, leftovers
    shutil.rmtree(out)


def _dense(store, name, j):
    """A shard's stored log-probabilities scattered to [m, s, vocab] (order of ties irrelevant)."""
    folder = os.path.join(store, name, f"shard_{j:06d}")
    ids = np.load(os.path.join(folder, "topk_ids.npy")).astype(np.int64)
    logp = np.load(os.path.join(folder, "topk_logprobs.npy"))
    dense = np.full(ids.shape[:-1] + (VOCAB,), -np.inf, dtype=np.float64)
    np.put_along_axis(dense, ids, logp, axis=-1)
    return dense, np.load(os.path.join(folder, "sample_ids.npy"))


def test_producer_at_pp2_equals_pp1(setup, offline, tmp_path):
    out = str(tmp_path / "store_pp2")
    tiny_run.run_tool(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
                      + cache_args(setup["cfg"], out, "parallel.pipeline_model_parallel_size=2"))
    ref = json.load(open(os.path.join(setup["store"], "header.json")))
    got = json.load(open(os.path.join(out, "header.json")))
    assert got["complete"] and got["identity"] == ref["identity"]
    for name, v in ref["valid_losses"].items():
        assert got["valid_losses"][name] == pytest.approx(v, rel=1e-6)
    for name, info in ref["domains"].items():
        for j in range(info["num_shards"]):
            (a, ids_a), (b, ids_b) = _dense(setup["store"], name, j), _dense(out, name, j)
            assert np.array_equal(ids_a, ids_b)
            assert np.allclose(a, b, rtol=0, atol=1e-5), (name, j)
    # a student at TP = 2 on a store against TP = 1 on it (and the TP = 2 logging rank reading
    # every sample): tests/training/test_offline_store_v2.py::test_tp2_on_a_compact_store_...
