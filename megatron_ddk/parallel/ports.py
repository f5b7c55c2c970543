"""A free TCP port for torch.distributed's rendezvous on this host.

Used by the parallel start-up (a single process without a launcher picks its own MASTER_PORT) and
by megatron_ddk.testing.multiproc. Imports nothing but the standard library.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
