"""A rank dies with its launcher, and a rank's helper processes die with the rank.

Installed at parallel start-up (parallel/state.initialize).

torchrun (and srun's step daemon, and run_distributed's parent) forwards SIGTERM to its ranks,
but a launcher killed with SIGKILL (an OOM kill, `kill -9`, a node agent) cannot forward
anything: its ranks are re-parented (to PID 1 or a subreaper) and go on training and writing
checkpoints, so a relaunch would have two writers. `exit_with_launcher()` makes the kernel send
this process SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG, through ctypes); where
prctl is missing, a daemon thread polls os.getppid() once a second and does the same. SIGKILL,
not SIGTERM: the pre-emption handler would try to checkpoint, and a relaunch may be starting.
Checkpoints stay consistent (a half-written iteration is never renamed into place).

`children_die_with_this_process()` does the same one level down: children forked from the main
thread (Megatron-Core's checkpoint writer processes, DataLoader workers) get SIGKILL when this
process dies, and Megatron-Core 0.16's checkpoint results queue (a spawned multiprocessing
Manager that dist_checkpointing keeps for the life of the process) is started with
`die_with_parent` as its initializer. Without it, a SIGKILLed trainer left that Manager and its
resource tracker running under PID 1 for good (and holding its stdout open).

A top-level module importing only the standard library (spawned helpers import it cheaply);
nothing from megatron_ddk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""prctl option number (linux/prctl.h)."""

MEGATRON_QUEUE_VERSION = "0.16"
"""Megatron-Core release whose filesystem_async._get_write_results_queue is wrapped."""

_INSTALLED = {"parent": None, "how": None, "at_fork": False, "forking_from_main": False}


def launched_by_launcher(env: Optional[dict] = None) -> bool:
    """True under torchrun / torch elastic, SLURM's srun, or any launcher that sets RANK and
    WORLD_SIZE (megatron_ddk.testing.multiproc does): then the parent is the launcher."""
    env = os.environ if env is None else env
    return ("TORCHELASTIC_RUN_ID" in env or "SLURM_PROCID" in env
            or ("RANK" in env and "WORLD_SIZE" in env))


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, interval: float) -> None:
    while True:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(interval)


def exit_with_launcher(use_prctl: bool = True, poll_seconds: float = 1.0) -> Optional[str]:
    """Make this process die (SIGKILL) when its parent process dies; returns how ('prctl' or
    'watchdog'), or None when not launched by a launcher. Idempotent.

    Args:
        use_prctl: False forces the polling thread (tests; non-Linux hosts use it anyway).
        poll_seconds: the polling thread's interval.
    """
    if not launched_by_launcher():
        return None
    if _INSTALLED["how"] is not None and _INSTALLED["parent"] == os.getppid():
        return _INSTALLED["how"]
    parent = os.getppid()
    how = "prctl" if use_prctl and _set_pdeathsig(signal.SIGKILL) else "watchdog"
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent, poll_seconds), daemon=True,
                         name="megatron-ddk-parent-watch").start()
    if os.getppid() != parent:  # the launcher died while the guard was being set
        logger.error("the launcher (pid %d) is gone: exiting", parent)
        os.kill(os.getpid(), signal.SIGKILL)
    _INSTALLED.update(parent=parent, how=how)
    logger.debug("rank exits with its launcher (pid %d) via %s", parent, how)
    return how


def watch_parent(poll_seconds: float = 0.5) -> None:
    """SIGKILL this process when its parent dies, by a daemon thread polling os.getppid() (a
    pool worker's initializer: unlike prctl it does not depend on which thread of the parent
    forked it). A parent already gone kills it at once."""
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent, poll_seconds), daemon=True,
                     name="megatron-ddk-parent-watch").start()
    if parent == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when this process's parent dies (a Manager initializer)."""
    _set_pdeathsig(signal.SIGKILL)


def _before_fork() -> None:
    _INSTALLED["forking_from_main"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* ends: only children forked from the
    # main thread (which lives as long as the process) can use it safely.
    if _INSTALLED["forking_from_main"]:
        die_with_parent()


def _guard_megatron_results_queue() -> bool:
    """Start Megatron-Core's checkpoint results Manager with die_with_parent (see above)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # no Megatron-Core: nothing to guard
        return False
    original = getattr(fa, "_get_write_results_queue", None)
    if original is None or not hasattr(fa, "_results_queue"):
        raise RuntimeError(
            "megatron.core.dist_checkpointing.strategies.filesystem_async no longer has "
            "_get_write_results_queue / _results_queue (written for Megatron-Core "
            f"{MEGATRON_QUEUE_VERSION}); update megatron_ddk/lifeline.py")
    if getattr(original, "megatron_ddk_guarded", False):
        return True

    def get_write_results_queue():
        if fa._results_queue is None:
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=die_with_parent)
            fa._results_queue = manager.Queue()  # the proxy keeps the manager alive
        return fa._results_queue

    get_write_results_queue.megatron_ddk_guarded = True
    fa._get_write_results_queue = get_write_results_queue
    return True


def children_die_with_this_process() -> None:
    """Helper processes of this process die with it (see the module docstring). Idempotent."""
    if not _INSTALLED["at_fork"] and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _INSTALLED["at_fork"] = True
    _guard_megatron_results_queue()
