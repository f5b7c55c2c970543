"""A rank dies with its launcher: the parent-death guard installed at parallel start-up.

torchrun (and srun's step daemon, and run_distributed's parent) forwards SIGTERM to its ranks,
but a launcher killed with SIGKILL (an OOM kill, `kill -9`, a node agent) cannot forward
anything: its ranks are re-parented (to PID 1 or a subreaper) and go on training and writing
checkpoints, so a relaunch would have two writers. `exit_with_launcher()` makes the kernel send
this process SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG, through ctypes); where
prctl is missing, a daemon thread polls os.getppid() once a second and does the same. SIGKILL,
not SIGTERM: the pre-emption handler would try to checkpoint, and a relaunch may be starting.
Checkpoints stay consistent (a half-written iteration is never renamed into place).

Imports nothing from megatron_ddk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""prctl option number (linux/prctl.h)."""

_INSTALLED = {"parent": None, "how": None}


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
