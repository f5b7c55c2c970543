"""torchrun with a failed worker reported in one line: `python -m megatron_ddk.parallel.torchrun`.

    python -m megatron_ddk.parallel.torchrun [torchrun flags] -m megatron_ddk.train --config ...

Takes torchrun's own flags and runs its launcher (torch.distributed.run) in this process, so
signals sent to it reach the elastic agent as with `torchrun`. When a worker fails, torchrun's
launcher raises ChildFailedError and prints its traceback; here the first failure becomes one
line instead, `error: rank R (local rank L on HOST) exited C: MESSAGE`, where MESSAGE is the
worker's own `error:` line (console.report_failure writes it to torchelastic's reply file) or
the signal that ended it. The exit code is the worker's (1 when a signal ended it).
scripts/launch.sh and scripts/slurm_distill.sbatch start training through this module.
"""

from __future__ import annotations

import socket
import sys
from typing import List, Optional

from megatron_ddk.console import messages


def failure_line(exc) -> tuple:
    """(one line naming the first failed rank and its message, exit code) of a
    ChildFailedError."""
    rank, failure = exc.get_first_failure()
    message = str(failure.message or "").strip().splitlines()
    text = message[-1] if message else "no message"
    if text.startswith("error: "):
        text = text[len("error: "):]
    code = failure.exitcode if failure.exitcode > 0 else 1
    return (f"error: rank {rank} (local rank {failure.local_rank} on {socket.getfqdn()}) "
            f"exited {failure.exitcode}: {text}", code)


def main(argv: Optional[List[str]] = None) -> int:
    """Run torchrun's launcher on argv; returns 0, or the first failed worker's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        line, code = failure_line(exc)
        messages().error(line)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
