"""Crash-safe checkpoints and exact continuation (CPU, real processes).

An uninterrupted run is the reference: a run killed with SIGKILL after a checkpoint and resumed
with --load must log identical records; SIGTERM checkpoints and exits 0; a crash in the middle of
a save leaves the previous checkpoint loadable; a checkpoint resumes at another layout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_ddk.testing import tiny_run

EXACT = ("loss", "lm_loss", "kd_loss", "lr", "grad_norm", "consumed_samples", "weights", "step")
INTERVAL_EXACT = ("interval", "step", "weights", "r", "loss_student", "loss_teacher",
                  "ratio_log_se", "ratio_ci95", "samples_consumed", "tokens_consumed", "epochs",
                  "train_lm_loss", "wraps")


def records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def config(tiny, run_dir, **kw):
    kw.setdefault("teacher_load", tiny["teacher"])
    kw.setdefault("train_iters", 10)
    kw.setdefault("interval", 4)
    cfg = tiny_run.run_config(tiny["manifest"], str(run_dir), **kw)
    cfg["checkpoint"]["save_interval"] = 3
    return tiny_run.write_config(cfg, os.path.join(str(run_dir), "run.yaml")), cfg


def start(cfg_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_ddk.train", "--config", cfg_path,
                             *extra], cwd=tiny_run.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(pred, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before the condition:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def latest(ckpt):
    path = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    return int(open(path).read()) if os.path.isfile(path) else 0


def assert_same_records(a_dir, b_dir):
    sa, sb = records(a_dir, "step"), records(b_dir, "step")
    assert [r["step"] for r in sb] == [r["step"] for r in sa]
    for ra, rb in zip(sa, sb):
        assert {k: ra[k] for k in EXACT} == {k: rb[k] for k in EXACT}, ra["step"]
    ia, ib = records(a_dir, "interval"), records(b_dir, "interval")
    assert [{k: r[k] for k in INTERVAL_EXACT} for r in ia] == \
        [{k: r[k] for k in INTERVAL_EXACT} for r in ib]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    path, _ = config(tiny, run_dir)
    tiny_run.train(path)
    return str(run_dir)


def test_sigkill_then_resume_is_exact(tiny, tmp_path, reference):
    path, cfg = config(tiny, tmp_path)
    ckpt = cfg["checkpoint"]["save"]
    proc = start(path)
    wait_for(lambda: latest(ckpt) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest(ckpt)
    assert killed_at in (3, 6, 9), "a SIGKILL leaves the last complete checkpoint as latest"
    tiny_run.train(path, overrides=["--load", ckpt])
    assert_same_records(reference, str(tmp_path))
    # the teacher's per-sample losses resume with the controller: every interval keeps its SE
    assert all(r["ratio_log_se"] for r in records(str(tmp_path), "interval"))


def test_sigterm_saves_and_exits_zero(tiny, tmp_path):
    path, cfg = config(tiny, tmp_path, train_iters=400)
    proc = start(path)
    wait_for(lambda: os.path.isfile(os.path.join(str(tmp_path), "metrics.jsonl")) and
             len(records(str(tmp_path), "step")) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    end = records(str(tmp_path), "end")[-1]
    assert end["reason"] == "signal" and end["step"] < 400
    assert latest(cfg["checkpoint"]["save"]) == end["step"]


CRASH_ON_SECOND_SAVE = """
import os, sys
from megatron.core import dist_checkpointing
real, calls = dist_checkpointing.save, []
def crashing(*a, **k):
    calls.append(1)
    real(*a, **k)
    if len(calls) == 2:
        os._exit(9)  # dies after writing the shards, before the folder is renamed into place
dist_checkpointing.save = crashing
from megatron_ddk.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def test_crash_mid_save_keeps_previous_checkpoint(tiny, tmp_path, reference):
    path, cfg = config(tiny, tmp_path)
    ckpt = cfg["checkpoint"]["save"]
    # own session and a log file: checkpoint writer processes orphaned by the crash must neither
    # hold our pipes open nor outlive the test
    with open(os.path.join(str(tmp_path), "crash.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CRASH_ON_SECOND_SAVE, path],
                                cwd=tiny_run.ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        code = proc.wait(timeout=300)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert code == 9
    assert latest(ckpt) == 3 and os.path.isdir(os.path.join(ckpt, "iter_0000006.tmp"))
    tiny_run.train(path, overrides=["--load", ckpt])
    assert latest(ckpt) == 10 and not os.path.exists(os.path.join(ckpt, "iter_0000006.tmp"))
    assert_same_records(reference, str(tmp_path))


def test_resume_at_another_layout(tiny, tmp_path):
    tp2 = tmp_path / "tp2"
    path, cfg = config(tiny, tp2, train_iters=8,
                       extra={"parallel": {"tensor_model_parallel_size": 2}})
    tiny_run.train(path, nproc=2)
    moved = tmp_path / "moved"
    path2, cfg2 = config(tiny, moved, train_iters=8)
    shutil.copytree(cfg["checkpoint"]["save"], cfg2["checkpoint"]["save"])
    # the TP=2 checkpoint of step 6 continues at TP=1 x DP=2
    with open(os.path.join(cfg2["checkpoint"]["save"], "latest_checkpointed_iteration.txt"),
              "w") as f:
        f.write("6")
    shutil.copy(os.path.join(str(tp2), "metrics.jsonl"), os.path.join(str(moved), "metrics.jsonl"))
    tiny_run.train(path2, nproc=2, overrides=["--load", cfg2["checkpoint"]["save"]])
    a, b = records(str(tp2), "step"), records(str(moved), "step")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a[6:], b[6:]):
        assert rb["consumed_samples"] == ra["consumed_samples"] and rb["weights"] == ra["weights"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
    ia, ib = records(str(tp2), "interval"), records(str(moved), "interval")
    assert [r["samples_consumed"] for r in ia] == [r["samples_consumed"] for r in ib]
    assert ia[0]["weights"] == ib[0]["weights"] and ia[1]["weights"] == ib[1]["weights"]


def test_refuses_checkpoint_of_other_shape_or_tokenizer(tiny, tmp_path, reference):
    ckpt = os.path.join(reference, "ckpt")
    path, _ = config(tiny, tmp_path / "shape", extra={"model": {"hidden_size": 48}})
    with pytest.raises(RuntimeError,
                       match="different model shape.*hidden_size: checkpoint 32 vs config 48"):
        tiny_run.train(path, overrides=["--load", ckpt])
    other = str(tmp_path / "other_tok")
    shutil.copytree(tiny["teacher"], other)
    folder = os.path.join(other, "iter_0000020")
    meta = json.load(open(os.path.join(folder, "megatron_ddk.json")))
    meta["tokenizer_hash"] = "sha256:" + "0" * 64
    json.dump(meta, open(os.path.join(folder, "megatron_ddk.json"), "w"))
    path, _ = config(tiny, tmp_path / "tok", teacher_load=other)
    with pytest.raises(RuntimeError, match="tokenizer mismatch"):
        tiny_run.train(path)
