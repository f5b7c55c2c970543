"""checkpoint.save_on_signal: false leaves SIGTERM its default action: the run ends at once,
writes no checkpoint and no end record (true is covered by test_resume.py's SIGTERM test)."""

import json
import os
import signal
import subprocess
import sys
import time

from megatron_ddk.testing import tiny_run


def test_sigterm_without_save_on_signal_ends_the_run_unsaved(tiny, tmp_path):
    cfg = tiny_run.run_config(tiny["manifest"], str(tmp_path), policy="static", train_iters=400,
                              extra={"checkpoint": {"save_on_signal": False,
                                                    "save_interval": 1000}})
    path = tiny_run.write_config(cfg, os.path.join(str(tmp_path), "run.yaml"))
    metrics = os.path.join(str(tmp_path), "metrics.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ddk.train", "--config", path],
                            cwd=tiny_run.ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 3):
            assert proc.poll() is None and time.time() < deadline, "run ended or stalled early"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kinds = [json.loads(line)["kind"] for line in open(metrics) if line.strip()]
    assert "end" not in kinds
    assert not os.path.exists(os.path.join(cfg["checkpoint"]["save"],
                                           "latest_checkpointed_iteration.txt"))
