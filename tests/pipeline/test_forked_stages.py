"""Stages run in a fork of the pipeline process end exactly as a separate interpreter would:
the same exit code, log text, atexit functions, joined threads and fresh logging / signal
state. Each case runs the same script both ways (MEGATRON_DDK_PIPELINE_FORK=0 is the reference,
a real `python script.py`) and compares what the two logs and exit codes say."""

import os
import sys
import textwrap

import pytest

from megatron_ddk.pipeline import forked
from megatron_ddk.pipeline.stage import Stage, StageFailed, StageRunner

SCRIPTS = {
    "ok": """
        import sys
        print("args", sys.argv[1:])
        print("main", __name__)
    """,
    "exit3": """
        import sys
        print("before")
        sys.exit(3)
    """,
    "exit_message": """
        raise SystemExit("refused: a message")
    """,
    "raises": """
        def f():
            raise RuntimeError("boom in the child")
        f()
    """,
    "atexit_and_thread": """
        import atexit, threading, time, sys
        out = sys.argv[1]
        def late():
            time.sleep(0.3)
            open(out, "a").write("thread\\n")
        threading.Thread(target=late).start()  # not a daemon: the exit waits for it
        atexit.register(lambda: open(out, "a").write("atexit\\n"))
        open(out, "a").write("main\\n")
    """,
    "logging_and_signals": """
        import logging, signal
        logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
        logging.getLogger("megatron_ddk.pipeline.child").info("info reaches the log")
        print("sigterm", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        print("sigint", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """,
}


@pytest.fixture(autouse=True)
def _light_warm(monkeypatch):
    monkeypatch.setattr(forked, "WARM_MODULES", ("json",))  # the mechanics, not torch's import


def _run_once(tmp_path, name, fork, monkeypatch, *args):
    monkeypatch.setenv(forked.ENV_SWITCH, "1" if fork else "0")
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(SCRIPTS[name]))
    out = tmp_path / ("fork" if fork else "exec")
    argv = [sys.executable, str(script), *args]
    assert forked.entry_point(argv) is not None  # the fork path, not a new interpreter
    runner = StageRunner(str(out))
    code = 0
    try:
        runner.run(Stage(name=name, command=lambda _r: argv, outputs=[]))
    except StageFailed as err:
        code = int(str(err).split("(exit ")[1].split(")")[0])
    log = (out / "logs" / f"{name}.log").read_text()
    return code, log.split("\n", 2)[2]  # drop the "# time $ argv" header line


@pytest.mark.parametrize("name,code", [("ok", 0), ("exit3", 3), ("exit_message", 1),
                                       ("raises", 1), ("logging_and_signals", 0)])
def test_fork_ends_like_a_separate_interpreter(tmp_path, monkeypatch, name, code):
    ref_code, ref_log = _run_once(tmp_path, name, False, monkeypatch, "a", "b c")
    got_code, got_log = _run_once(tmp_path, name, True, monkeypatch, "a", "b c")
    assert ref_code == got_code == code
    if name == "raises":  # same traceback tail; frames above the script differ (runpy)
        assert "RuntimeError: boom in the child" in got_log
        assert got_log.strip().splitlines()[-1] == ref_log.strip().splitlines()[-1]
    else:
        assert got_log == ref_log
    if name == "logging_and_signals":  # sigint: False where this session ignores SIGINT
        assert "LOG INFO info reaches the log" in got_log and "sigterm True" in got_log


def test_an_ignored_sigint_stays_ignored_as_across_exec(tmp_path, monkeypatch):
    """A background job's ignored SIGINT survives exec; the fork must keep it too."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ref = _run_once(tmp_path, "logging_and_signals", False, monkeypatch)
        got = _run_once(tmp_path, "logging_and_signals", True, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ref == got and "sigint False" in got[1]


def test_fork_joins_threads_and_runs_only_its_own_atexit(tmp_path, monkeypatch):
    parent_marker = tmp_path / "parent_atexit.txt"
    import atexit

    def parent_exit():  # registered in this (parent) process: must not run in the child
        parent_marker.write_text("ran")

    atexit.register(parent_exit)
    try:
        for fork in (False, True):
            out = tmp_path / f"events_{fork}.txt"
            code, _ = _run_once(tmp_path, "atexit_and_thread", fork, monkeypatch, str(out))
            assert code == 0
            assert out.read_text().split() == ["main", "thread", "atexit"]
        assert not parent_marker.exists()
    finally:
        atexit.unregister(parent_exit)


def test_module_entry_and_what_is_not_forked(tmp_path):
    run = forked.entry_point([sys.executable, "-m", "megatron_ddk.cli", "--help"])
    assert run is not None
    assert forked.entry_point([sys.executable, "-c", "print(1)"]) is None
    assert forked.entry_point([sys.executable, "-m", "torch.distributed.run", "x"]) is None
    assert forked.entry_point(["/bin/echo", "x"]) is None
    assert forked.entry_point([sys.executable, str(tmp_path / "missing.py")]) is None


def test_killing_the_forked_stage_is_reported(tmp_path, monkeypatch):
    """A child killed by a signal fails its stage with the signal's negative exit code."""
    monkeypatch.setenv(forked.ENV_SWITCH, "1")
    script = tmp_path / "selfkill.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    runner = StageRunner(str(tmp_path / "out"))
    with pytest.raises(StageFailed, match=r"exit -9"):
        runner.run(Stage(name="k", command=lambda _r: [sys.executable, str(script)]))
    assert os.path.isfile(tmp_path / "out" / "logs" / "k.log")


def test_switch_and_gpu_hosts(monkeypatch):
    """Forking is off on a host with an NVIDIA driver unless asked for, and the switch wins."""
    monkeypatch.delenv(forked.ENV_SWITCH, raising=False)
    monkeypatch.setattr(forked, "gpu_host", lambda: True)
    assert not forked.enabled()
    monkeypatch.setenv(forked.ENV_SWITCH, "1")
    assert forked.enabled()
    monkeypatch.setattr(forked, "gpu_host", lambda: False)
    monkeypatch.setenv(forked.ENV_SWITCH, "0")
    assert not forked.enabled()
    monkeypatch.delenv(forked.ENV_SWITCH)
    assert forked.enabled()
