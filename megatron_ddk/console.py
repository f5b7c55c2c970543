"""User-facing command output (errors, results, check verdicts) through `logging`.

The `megatron-ddk` commands report to people, not to log files: plain lines without timestamps,
errors and verdicts on stderr, results (tables) on stdout. These two loggers do that and do not
propagate to the root logger, whose format the trainer sets for its own log.
"""

from __future__ import annotations

import logging
import sys


def _plain(name: str, stream) -> logging.Logger:
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def messages() -> logging.Logger:
    """Errors and verdicts, on stderr."""
    return _plain("megatron_ddk.console.messages", sys.stderr)


def results() -> logging.Logger:
    """Results such as the eval table, on stdout."""
    return _plain("megatron_ddk.console.results", sys.stdout)


def run_or_exit(fn, *args, **kwargs):
    """Call fn; a ValueError (a user error) becomes one `error: ...` line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        messages().error(f"error: {err}")
        raise SystemExit(2) from None
