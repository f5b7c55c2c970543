"""Run a stage's Python command in a forked child of the warmed-up pipeline process.

Most stages are `python -m megatron_ddk.cli ...` or `python tools/X.py ...` in one process. A
new interpreter spends 7-10 s of CPU importing torch and Megatron-Core before it does anything
(measured on 2 CPU cores), which is most of an evaluation stage and a tenth of a demo training
stage. The pipeline imports those modules once (`warm`), then forks one child per stage that
runs exactly the entry point the argv names, with the same arguments, environment, log file and
exit code as the separate interpreter would have: standard streams go to the stage log, logging
and signal handlers start as in a fresh interpreter, and the child ends the way CPython ends a
program (join non-daemon threads, run its own atexit functions, flush) before `os._exit`.

Commands that are not a plain Python entry point (torchrun for launch.nproc_per_node > 1, other
programs) run as separate processes, and so does every stage on a host with an NVIDIA driver
(CUDA does not survive a fork); `MEGATRON_DDK_PIPELINE_FORK=0` / `1` turns forking off / on.
"""

from __future__ import annotations

import atexit
import importlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref
from typing import Callable, Dict, List, Optional

ENV_SWITCH = "MEGATRON_DDK_PIPELINE_FORK"
"""0: every stage a separate interpreter; 1: fork even on a GPU host; unset: see enabled()."""

WARM_MODULES = ("megatron_ddk.training.entry", "megatron.core.models.gpt")
"""Imported once in the pipeline process (and by the tests' fork server): torch, Megatron-Core,
the trainer and the GPT model it builds (imported lazily by the trainer)."""


def gpu_host() -> bool:
    """An NVIDIA driver is present. CUDA does not work in the fork of a process that has
    initialised it, and importing torch and Megatron-Core may probe it, so the default is no
    fork on such hosts (their stages are long; the imports are a small share of them)."""
    return os.path.exists("/dev/nvidiactl")


def enabled() -> bool:
    """MEGATRON_DDK_PIPELINE_FORK=0 / 1 turns forking off / on; by default it is on where
    os.fork exists (Linux, macOS) and no NVIDIA driver is present."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch in ("0", "1"):
        return switch == "1" and hasattr(os, "fork")
    return hasattr(os, "fork") and not gpu_host()


def entry_point(argv: List[str]) -> Optional[Callable[[], None]]:
    """What the child runs for `argv`, or None when argv is not `sys.executable -m MODULE ...`
    or `sys.executable SCRIPT.py ...` (then the stage runs as a separate process)."""
    if len(argv) < 2 or argv[0] != sys.executable:
        return None
    if argv[1] == "-m" and len(argv) >= 3 and argv[2].startswith("megatron_ddk."):
        module, args = argv[2], argv[3:]

        def run_module() -> None:
            sys.argv = [module] + args  # run_module sets argv[0] to the module's file
            sys.path.insert(0, os.getcwd())  # as `python -m` does
            # the module may be imported already (the pipeline runs from megatron_ddk.cli):
            # runpy warns about that, a new interpreter would not
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import",
                                    category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        return run_module
    if argv[1].endswith(".py") and os.path.isfile(argv[1]):
        script, args = argv[1], argv[2:]

        def run_script() -> None:
            sys.argv = [script] + args
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            runpy.run_path(script, run_name="__main__")
        return run_script
    return None


def warm() -> None:
    """Import the heavy modules the stages use, once, in the pipeline process (quietly: their
    import-time notices belong in the stage logs, not on the pipeline's console)."""
    if all(name in sys.modules for name in WARM_MODULES):
        return
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in WARM_MODULES:
                importlib.import_module(name)
    finally:
        logging.disable(logging.NOTSET)


def _fresh_streams() -> None:
    """sys.stdout / sys.stderr on fds 1 / 2 (now the stage log) as a new interpreter opens them
    for a file (stdout block-buffered, stderr line-buffered), and every logging handler that
    wrote to the old streams moved to the new ones."""
    old = {id(sys.stdout): "out", id(sys.stderr): "err", id(sys.__stdout__): "out",
           id(sys.__stderr__): "err"}
    new = {"out": io.open(1, "w", encoding=sys.stdout.encoding, closefd=False),
           "err": io.open(2, "w", buffering=1, encoding=sys.stderr.encoding,
                          errors="backslashreplace", closefd=False)}
    sys.stdout = sys.__stdout__ = new["out"]
    sys.stderr = sys.__stderr__ = new["err"]
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            which = old.get(id(getattr(handler, "stream", None)))
            if which and isinstance(handler, logging.StreamHandler):
                handler.setStream(new[which])


def _fresh_interpreter_state() -> None:
    """Streams, logging, signal and exit handlers as a new interpreter has them."""
    _fresh_streams()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("megatron_ddk.pipeline").setLevel(logging.NOTSET)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            continue  # exec keeps an ignored signal ignored (a background job's SIGINT)
        signal.signal(sig, signal.SIG_DFL)  # exec resets a handled signal to the default
        if sig == signal.SIGINT:  # CPython's start-up: KeyboardInterrupt unless ignored
            signal.signal(sig, signal.default_int_handler)
    atexit._clear()  # the pipeline's exit functions are not the child's
    for info in list(getattr(weakref.finalize, "_registry", {}).values()):
        info.atexit = False
    weakref.finalize._registered_with_atexit = False


def _exit_code(err: SystemExit) -> int:
    """The process exit code CPython gives for `raise SystemExit(code)`."""
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code
    sys.stderr.write(f"{err.code}\n")  # what CPython prints for a non-int exit code
    return 1


def _finish(code: int) -> None:
    """End the child as interpreter shutdown would, then leave without the parent's cleanup."""
    try:
        threading._shutdown()  # join non-daemon threads (what Py_FinalizeEx does first)
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a failing exit function must not skip os._exit
        traceback.print_exc()
        code = code or 1
    os._exit(code)


def _match_threads() -> None:
    """torch's intra-op threads as a new interpreter would set them from this environment (a
    fork keeps the count torch chose when the parent imported it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        n = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(n) if n.isdigit() and int(n) > 0
                              else len(os.sched_getaffinity(0)))


def child_main(run: Callable[[], None], log_fd: int,
               environ: Optional[Dict[str, str]] = None,
               before: Optional[Callable[[], None]] = None) -> None:
    """In a freshly forked child: stdout and stderr on `log_fd`, `environ` (default: kept) as
    the environment, then `run()`; ends the process with the exit code a separate interpreter
    running the same program would have. Never returns."""
    code = 1
    try:
        if before is not None:
            before()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        if environ is not None:
            os.environ.clear()
            os.environ.update(environ)
        _fresh_interpreter_state()
        _match_threads()
        try:
            run()
            code = 0
        except SystemExit as err:
            code = _exit_code(err)
        except BaseException:  # noqa: BLE001 - as the interpreter does: traceback, exit 1
            traceback.print_exc()
            code = 1
    finally:
        _finish(code)


def spawn(run: Callable[[], None], log_fd: int, before: Callable[[], None]) -> int:
    """Fork a child that runs `run` with stdout and stderr on `log_fd`; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (its exit code is what the tests check)
        child_main(run, log_fd, before=before)
    return pid


class ForkedProcess:
    """The subset of subprocess.Popen the stage runner uses, for a forked child."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: Optional[int] = None

    def _status(self, flags: int) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> Optional[int]:
        return self._status(os.WNOHANG)

    def wait(self, timeout: Optional[float] = None) -> int:
        """The exit code; with a timeout, subprocess.TimeoutExpired if still running then."""
        if timeout is None:
            return self._status(0)
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
