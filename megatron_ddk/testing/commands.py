"""Run a repository command for a test, forked from the warm fork server instead of exec'd.

`run_command([sys.executable, "-m", "megatron_ddk.train", ...], env)` behaves like
`subprocess.run(argv, env=env, stdout+stderr to one stream)`: same program, arguments,
environment, output and exit code (megatron_ddk.pipeline.forked runs it in the child exactly as a
new interpreter would). The child comes from multiprocessing's fork server, which imported torch,
Megatron-Core and the trainer once (multiproc.PRELOAD) and never computed anything, so a tiny
training command starts in well under a second instead of spending 7-10 s of CPU on imports.
Commands that are not a Python entry point (torchrun, other programs), and every command when
the start method is spawn (MEGATRON_DDK_MP_START=spawn, or a host with an NVIDIA driver), run as
separate processes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Dict, List, Tuple

from megatron_ddk.pipeline import forked
from megatron_ddk.testing.multiproc import context, start_method


def _child(argv: List[str], log_path: str, environ: Dict[str, str], cwd: str) -> None:
    os.chdir(cwd)
    run = forked.entry_point(argv)
    forked.child_main(run, os.open(log_path, os.O_WRONLY | os.O_APPEND), environ)


def run_command(argv: List[str], env: Dict[str, str], cwd: str,
                timeout: float) -> Tuple[int, str]:
    """(exit code, stdout and stderr interleaved) of `argv` run with `env` in `cwd`."""
    if start_method() != "forkserver" or forked.entry_point(argv) is None:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return proc.returncode, proc.stdout
    with tempfile.NamedTemporaryFile("w+", suffix=".log", errors="replace") as log:
        proc = context().Process(target=_child, args=(argv, log.name, dict(env), cwd))
        proc.start()
        proc.join(timeout)
        timed_out = proc.exitcode is None
        if timed_out:
            proc.kill()
            proc.join()
        log.seek(0)
        output = log.read()
    if timed_out:
        raise subprocess.TimeoutExpired(argv, timeout, output=output)
    return proc.exitcode, output
