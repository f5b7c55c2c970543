"""One pipeline stage: a real megatron-ddk / tools command with its own log, stamp and timing.

`StageRunner.run(stage)` decides from the stamp (megatron_ddk.pipeline.stamps) whether the stage
is skipped, resumed or started fresh, runs its command as a child process that dies with the
pipeline (a killed pipeline never leaves a trainer writing checkpoints; Python entry points run
in a fork of the warmed-up pipeline process, forked.py), streams one status line (training
stages: step progress parsed from the trainer's log) and fails with the log's tail.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from megatron_ddk.console import CommandFailed
from megatron_ddk.pipeline import forked
from megatron_ddk.pipeline.stamps import Stamp, file_fingerprint, hash_json

logger = logging.getLogger("megatron_ddk.pipeline")

_STEP = re.compile(r"step\s+(\d+)/(\d+)")


class StageFailed(CommandFailed):
    """A stage's command exited non-zero; the message names the stage and its log (exit 1)."""


@dataclass
class Stage:
    """What one stage does and what decides whether it must run again."""

    name: str
    """Unique name, e.g. teacher, arm/DDK/seed1234, eval/teacher."""

    command: Callable[[bool], List[str]]
    """command(resume) -> argv; called only when the stage runs (resume: continue a killed run)."""

    settings: Dict[str, Any] = field(default_factory=dict)
    """Everything about the stage's configuration that must rerun it when changed."""

    inputs: List[str] = field(default_factory=list)
    """Files / folders outside the pipeline read by the stage (fingerprinted)."""

    deps: List[str] = field(default_factory=list)
    """Stages whose outputs this stage reads (their keys enter this key)."""

    outputs: List[str] = field(default_factory=list)
    """Paths that exist once the stage is done."""

    clean: List[str] = field(default_factory=list)
    """Paths removed before a fresh (not resumed) start."""

    resumable: bool = False
    """A killed run continues (from its last checkpoint) instead of starting over."""

    prepare: Optional[Callable[[], None]] = None
    """Called right before the command (e.g. writes the run config)."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL when the pipeline process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _Progress:
    """Step progress of a training stage: a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, name: str):
        self.name, self.bar, self.last_print, self.last_step = name, None, 0.0, -1
        self.tty = sys.stderr.isatty()

    def update(self, step: int, total: int) -> None:
        if step == self.last_step:
            return
        self.last_step = step
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=f"[pipeline] {self.name}", unit="step",
                                leave=False)
            self.bar.n = step
            self.bar.refresh()
        elif time.time() - self.last_print > 20 or step == total:
            self.last_print = time.time()
            logger.info("[pipeline] %s: step %d/%d", self.name, step, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _start(argv: List[str], log):
    """The stage's process: a forked child of this (warmed-up) process when argv is a Python
    entry point (forked.py), else a separate program; either dies with the pipeline."""
    run = forked.entry_point(argv) if forked.enabled() else None
    if run is None:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent, env=dict(os.environ))
    forked.warm()
    return forked.ForkedProcess(forked.spawn(run, log.fileno(), _die_with_parent))


class StageRunner:
    """Runs stages in the order given, under one output folder."""

    def __init__(self, out: str):
        self.out = out
        self.logs = os.path.join(out, "logs")
        self.stamps = os.path.join(out, "stamps")
        self.keys: Dict[str, str] = {}
        self.timing: Dict[str, float] = {}
        self.ran: List[str] = []

    def key(self, stage: Stage) -> str:
        missing = [d for d in stage.deps if d not in self.keys]
        if missing:
            raise RuntimeError(f"stage {stage.name} depends on {missing}, not run before it")
        return hash_json({"settings": stage.settings,
                          "inputs": file_fingerprint(stage.inputs),
                          "deps": [self.keys[d] for d in stage.deps]})

    def run(self, stage: Stage) -> None:
        key = self.key(stage)
        self.keys[stage.name] = key
        stamp = Stamp(self.stamps, stage.name)
        state = stamp.state(key, stage.outputs)
        if state == "done":
            self.timing[stage.name] = stamp.seconds or 0.0
            logger.info("[pipeline] %-28s skipped (unchanged; ran in %.1f s)", stage.name,
                        stamp.seconds or 0.0)
            return
        resume = state == "running" and stage.resumable
        spent = float(stamp.data.get("seconds_so_far", 0.0)) if resume else 0.0
        if not resume:
            for path in stage.clean:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
                    os.path.exists(path) and os.remove(path))
        stamp.data = {} if not resume else stamp.data
        stamp.write(key=key, state="running", stage=stage.name, outputs=stage.outputs,
                    seconds_so_far=spent)
        if stage.prepare is not None:
            stage.prepare()
        argv = stage.command(resume)
        logger.info("[pipeline] %-28s %s ...", stage.name, "resuming" if resume else "running")
        seconds = self._execute(stage, argv, stamp, spent)
        stamp.write(state="done", seconds=round(seconds, 1), seconds_so_far=round(seconds, 1))
        self.timing[stage.name] = seconds
        self.ran.append(stage.name)
        logger.info("[pipeline] %-28s done in %.1f s", stage.name, seconds)

    def _execute(self, stage: Stage, argv: List[str], stamp: Stamp, spent: float) -> float:
        os.makedirs(self.logs, exist_ok=True)
        log_path = os.path.join(self.logs, stage.name.replace("/", "_") + ".log")
        t0 = time.time()
        progress = _Progress(stage.name)
        with open(log_path, "a") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(argv)}\n")
            log.flush()
            proc = _start(argv, log)
            try:
                while proc.poll() is None:
                    try:  # returns as soon as the child ends; at most 1 s between reports
                        proc.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        pass
                    self._report_progress(log_path, progress)
                    stamp.write(seconds_so_far=round(spent + time.time() - t0, 1))
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                progress.close()
        if proc.returncode != 0:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-3000:]
            raise StageFailed(f"stage {stage.name} failed (exit {proc.returncode}); log "
                              f"{log_path}:\n{tail}")
        return spent + time.time() - t0

    @staticmethod
    def _report_progress(log_path: str, progress: _Progress) -> None:
        try:
            with open(log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(log_path) - 4096))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            return
        found = _STEP.findall(tail)
        if found:
            step, total = found[-1]
            progress.update(int(step), int(total))
