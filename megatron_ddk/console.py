"""User-facing command output (errors, results, check verdicts) through `logging`.

The `megatron-ddk` commands report to people, not to log files: plain lines without timestamps,
errors and verdicts on stderr, results (tables) on stdout. These two loggers do that and do not
propagate to the root logger, whose format the trainer sets for its own log.

It also owns the one mapping from a command's failure to its exit code, used by every
`megatron-ddk` subcommand (run_command) and by tools/ (run_or_exit):
    0  success
    1  a CommandFailed without its own code (the pipeline's StageFailed: a stage's command failed)
    2  a user error: ValueError (ConfigError is one): a bad config, flag, file or value
    3  NonFiniteLossError: the loss became NaN or inf
Anything else is a bug and keeps its traceback.

Must not import anything of megatron_ddk (the bottom layer; every other layer may use it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Callable, Union


class _StdHandler(logging.StreamHandler):
    """Writes to sys.stdout / sys.stderr as they are at each message (so a redirected or
    captured stream gets the lines), or to the stream setStream fixed (None: back to sys)."""

    def __init__(self, name: str):
        super().__init__(getattr(sys, name))
        self._name, self._fixed = name, None

    def setStream(self, stream):
        old, self._fixed = self._fixed, stream
        return old

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._fixed or getattr(sys, self._name)
        super().emit(record)


def _plain(name: str, stream: str) -> logging.Logger:
    log = logging.getLogger(name)
    if not log.handlers:
        handler = _StdHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def messages() -> logging.Logger:
    """Errors and verdicts, on stderr."""
    return _plain("megatron_ddk.console.messages", "stderr")


def results() -> logging.Logger:
    """Results such as the eval table, on stdout."""
    return _plain("megatron_ddk.console.results", "stdout")


USER_ERROR = 2
"""Exit code of a user error (ValueError, ConfigError): a bad config, flag, file or value."""


class CommandFailed(RuntimeError):
    """A failure that is not a user error and ends a command with its own exit code.

    Subclasses set `exit_code` (training's NonFiniteLossError: 3, the pipeline's StageFailed: 1).
    """

    exit_code: int = 1
    """The process exit code of this failure."""


def report_failure(err: Union[CommandFailed, ValueError]) -> int:
    """Write `error: <message>` to stderr and return the failure's exit code (module docstring).
    Under torchrun the line also goes to the worker's reply file, so the launcher's failure
    summary names it (parallel/torchrun.py prints it as its one line)."""
    line = f"error: {err}"
    messages().error(line)
    _elastic_reply(line)
    return err.exit_code if isinstance(err, CommandFailed) else USER_ERROR


def _elastic_reply(line: str) -> None:
    """torchelastic's reply file (TORCHELASTIC_ERROR_FILE, set by torchrun for each worker):
    {"message": line, "timestamp": s}, the form its failure summary reads. Written whole by this
    process just before it exits; the agent reads it only after the exit."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the error line is on stderr already


def run_command(fn: Callable[..., int], *args, **kwargs) -> int:
    """Call a command's entry function and return its exit code (None counts as 0); a
    ValueError or CommandFailed becomes one `error:` line and its code (report_failure)."""
    try:
        code = fn(*args, **kwargs)
    except (CommandFailed, ValueError) as err:
        return report_failure(err)
    return 0 if code is None else code


def run_or_exit(fn, *args, **kwargs):
    """Call fn and return its result (tools/); a failure exits with report_failure's code."""
    try:
        return fn(*args, **kwargs)
    except (CommandFailed, ValueError) as err:
        raise SystemExit(report_failure(err)) from None
