"""run_distributed (megatron_ddk.testing.multiproc): ranks forked from the fork server see the
caller's environment as it is at the call, as spawned interpreters would, and get torchrun's
variables; the start method is a checked setting."""

import os

import pytest

from megatron_ddk.testing.multiproc import START_ENV, run_distributed


def _environment(rank, world_size):
    return {k: os.environ.get(k) for k in ("MEGATRON_DDK_PROBE", "RANK", "WORLD_SIZE")}


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ranks_see_the_callers_environment_at_the_call(monkeypatch, method):
    monkeypatch.setenv(START_ENV, method)
    monkeypatch.setenv("MEGATRON_DDK_PROBE", "first")
    assert [r["MEGATRON_DDK_PROBE"] for r in run_distributed(_environment, 2)] == ["first"] * 2
    monkeypatch.setenv("MEGATRON_DDK_PROBE", "second")  # the fork server started with "first"
    got = run_distributed(_environment, 2)
    assert [(r["MEGATRON_DDK_PROBE"], r["RANK"], r["WORLD_SIZE"]) for r in got] == [
        ("second", "0", "2"), ("second", "1", "2")]


def test_unknown_start_method_is_named(monkeypatch):
    monkeypatch.setenv(START_ENV, "fork")
    with pytest.raises(ValueError, match=f"{START_ENV}='fork'"):
        run_distributed(_environment, 1)


SCRIPT = """
import os, sys
print("cwd", os.getcwd())
print("probe", os.environ.get("MEGATRON_DDK_PROBE"))
print("argv", sys.argv[1:])
sys.stderr.write("to stderr\\n")
sys.exit(int(sys.argv[1]))
"""


def test_run_command_matches_a_new_interpreter(tmp_path, monkeypatch):
    """testing.commands.run_command (fork server) and a real subprocess agree on exit code,
    output, working folder, environment and arguments."""
    import subprocess
    import sys

    from megatron_ddk.testing.commands import run_command

    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, MEGATRON_DDK_PROBE="x y")
    argv = [sys.executable, str(script), "7", "two words"]
    monkeypatch.setenv(START_ENV, "forkserver")
    code, out = run_command(argv, env, str(tmp_path), 60)
    ref = subprocess.run(argv, env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert code == ref.returncode == 7
    assert sorted(out.splitlines()) == sorted((ref.stdout + ref.stderr).splitlines())
    assert f"cwd {tmp_path}" in out and "probe x y" in out and "['7', 'two words']" in out
    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, str(sleeper)], env, str(tmp_path), 2)


def test_gpu_hosts_spawn_by_default(monkeypatch):
    from megatron_ddk.testing import multiproc

    monkeypatch.delenv(START_ENV, raising=False)
    monkeypatch.setattr(multiproc, "gpu_host", lambda: True)
    assert multiproc.start_method() == "spawn"
    monkeypatch.setattr(multiproc, "gpu_host", lambda: False)
    assert multiproc.start_method() == "forkserver"
    monkeypatch.setenv(START_ENV, "spawn")
    assert multiproc.start_method() == "spawn"
