"""Ranks exit when their torchrun launcher is SIGKILLed (megatron_ddk/lifeline.py via initialize()).

Real launches: `python -m torch.distributed.run --standalone --nproc-per-node=2`, gloo ranks
that write their pid and then wait forever; the launcher gets SIGKILL (it cannot forward
anything). With initialize() (prctl PR_SET_PDEATHSIG) both ranks are gone within seconds; the
polling-thread fallback does the same; a rank without the guard survives (the control that
shows the check can fail)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from megatron_ddk.testing import tiny_run

RANK = """
import os, sys, time
mode = sys.argv[1]
if mode == "initialize":
    from megatron_ddk.parallel import initialize
    initialize(backend="gloo")
elif mode == "watchdog" and os.environ["RANK"] == "1":
    from megatron_ddk.lifeline import exit_with_launcher
    assert exit_with_launcher(use_prctl=False, poll_seconds=0.2) == "watchdog"
with open(os.path.join(sys.argv[2], "rank%s.pid" % os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(1)
"""


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _launch_and_kill(tmp_path, mode):
    """Start 2 ranks under torchrun, SIGKILL torchrun once both run; return their pids."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=tiny_run.ROOT)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), mode, str(tmp_path)], cwd=tiny_run.ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
    deadline = time.time() + 240
    while not all(f.exists() and f.read_text() for f in files):
        assert launcher.poll() is None, f"torchrun exited {launcher.returncode} early"
        assert time.time() < deadline, "ranks did not start"
        time.sleep(0.1)
    pids = [int(f.read_text()) for f in files]
    assert all(psutil.Process(p).ppid() == launcher.pid for p in pids)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    return pids


def _wait_gone(pids, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ranks_exit_when_torchrun_is_killed(tmp_path):
    pids = _launch_and_kill(tmp_path, "initialize")
    try:
        assert _wait_gone(pids, 5) == []
    finally:
        _kill(pids)


def test_watchdog_fallback_and_unguarded_control(tmp_path):
    pids = _launch_and_kill(tmp_path, "watchdog")  # rank 1 polls getppid(), rank 0 has no guard
    try:
        assert _wait_gone(pids[1:], 5) == []
        time.sleep(1)
        assert _alive(pids[0]), "without the guard a rank outlives its launcher"
    finally:
        _kill(pids)


SAVE_THEN_DIE = """
import json, os, signal, sys
import psutil
from megatron_ddk.config import ModelConfig
from megatron_ddk.models.build import build_gpt_model
from megatron_ddk.models.checkpoint import save_model
from megatron_ddk.parallel import initialize

if __name__ == "__main__":
    ctx = initialize(seed=1)
    model = build_gpt_model(ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                        max_position_embeddings=16), ctx, 64)
    save_model(sys.argv[1], 1, model, {"padded_vocab_size": 64})
    kids = [p.pid for p in psutil.Process().children(recursive=True)]
    with open(sys.argv[2], "w") as f:
        json.dump(kids, f)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_checkpoint_helpers_die_with_a_killed_trainer(tmp_path):
    """dist_checkpointing keeps a spawned results Manager (and its resource tracker) for the
    life of a saving process; with the guard they go when that process is SIGKILLed."""
    script, kids = tmp_path / "save_then_die.py", tmp_path / "kids.json"
    script.write_text(SAVE_THEN_DIE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(kids)],
                          cwd=tiny_run.ROOT, env=dict(env, OMP_NUM_THREADS="1",
                                                      PYTHONPATH=tiny_run.ROOT),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    pids = json.loads(kids.read_text())
    try:
        assert pids, "the save started no helper process (nothing to check)"
        assert _wait_gone(pids, 5) == []
    finally:
        _kill(pids)


def test_megatron_results_queue_symbol_is_still_there():
    """Fails when Megatron-Core renames what lifeline.py wraps (written for 0.16)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from megatron_ddk.lifeline import _guard_megatron_results_queue

    assert callable(fa._get_write_results_queue) and hasattr(fa, "_results_queue")
    saved = fa._get_write_results_queue
    try:
        assert _guard_megatron_results_queue()
        assert fa._get_write_results_queue.megatron_ddk_guarded
    finally:
        fa._get_write_results_queue = saved
