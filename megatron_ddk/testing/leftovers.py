"""pytest plugin: a test session leaves no process behind.

At the start of the session a marker variable (MEGATRON_DDK_TEST_SESSION=<pid>-<random>) is put
into the environment, so every process the tests start inherits it: subprocesses, torchrun and
its ranks, multiprocessing children, and their children, even after they are re-parented to
PID 1. At the end, any process still carrying the session's marker (other than pytest itself and
its own multiprocessing resource tracker and fork server, which end with it) is reported, killed,
and the session fails. tests/conftest.py loads it; `pytest -p megatron_ddk.testing.leftovers`
does too.
Imports nothing from megatron_ddk.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import List

import psutil

MARKER = "MEGATRON_DDK_TEST_SESSION"
"""Environment variable every process started by the test session inherits."""

GRACE_SECONDS = 10.0
"""How long processes get to finish exiting after the last test."""

_TOKEN = {"value": None}


def session_processes(token: str) -> List[psutil.Process]:
    """Live processes (not pytest itself) whose environment carries this session's marker."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "status", "cmdline"]):
        info = proc.info
        if info["pid"] == me or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(info["cmdline"] or [])
        if info["ppid"] == me and ("multiprocessing.resource_tracker" in cmd
                                   or "multiprocessing.forkserver" in cmd):
            continue  # pytest's own tracker and fork server: they end when pytest does
        try:
            if proc.environ().get(MARKER) == token:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def pytest_sessionstart(session) -> None:
    _TOKEN["value"] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[MARKER] = _TOKEN["value"]


def pytest_sessionfinish(session, exitstatus) -> None:
    token = _TOKEN["value"]
    if token is None:
        return
    deadline = time.monotonic() + GRACE_SECONDS
    left = session_processes(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_processes(token)
    if not left:
        return
    lines = [_describe(p) for p in left]
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = ("the test session left processes running (now killed):\n  " + "\n  ".join(lines))
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(text, red=True, bold=True)
    session.exitstatus = 1  # pytest.ExitCode.TESTS_FAILED
