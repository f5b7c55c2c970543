"""The session check (megatron_ddk.testing.leftovers): a pytest run that leaves a process behind
fails, naming and killing it; a clean run passes. Each case is a real nested pytest run."""

import os
import subprocess
import sys
import textwrap

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEAVES_ORPHAN = textwrap.dedent('''
    import os, subprocess, sys

    def test_starts_a_daemon():
        # a grandchild re-parented to PID 1: its parent exits at once
        subprocess.run([sys.executable, "-c",
                        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
                        "'import time; time.sleep(120)'], start_new_session=True); print(p.pid)"],
                       check=True, stdout=open(os.environ["ORPHAN_PID_FILE"], "w"))
''')

CLEAN = textwrap.dedent('''
    import subprocess, sys

    def test_waits_for_its_child():
        subprocess.run([sys.executable, "-c", "pass"], check=True)
''')

USES_FORK_SERVER = textwrap.dedent('''
    import multiprocessing as mp

    def _noop():
        pass

    def test_starts_a_rank_from_the_fork_server():
        ctx = mp.get_context("forkserver")
        p = ctx.Process(target=_noop)
        p.start()
        p.join()
        assert p.exitcode == 0
''')


def _nested(tmp_path, body):
    test = tmp_path / "test_nested.py"
    test.write_text(body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "megatron_ddk.testing.leftovers", "--rootdir", str(tmp_path),
                           "-c", os.devnull, str(test)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT,
                                   ORPHAN_PID_FILE=str(tmp_path / "orphan.pid")))


def test_a_left_process_fails_the_session_and_is_killed(tmp_path):
    proc = _nested(tmp_path, LEAVES_ORPHAN)
    pid = int((tmp_path / "orphan.pid").read_text())
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout
    assert "the test session left processes running (now killed)" in proc.stdout
    assert f"pid {pid} " in proc.stdout and "time.sleep(120)" in proc.stdout
    try:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass


def test_a_clean_session_passes(tmp_path):
    proc = _nested(tmp_path, CLEAN)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "left processes running" not in proc.stdout


def test_the_sessions_own_fork_server_is_not_a_leftover(tmp_path):
    """run_distributed's fork server lives until pytest exits, like the resource tracker."""
    proc = _nested(tmp_path, USES_FORK_SERVER)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout and "left processes running" not in proc.stdout
