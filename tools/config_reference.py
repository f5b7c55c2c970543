"""`megatron-ddk config-reference` for a checkout (flags: --help). The command lives in
megatron_ddk/commands/config_reference.py; this wrapper only puts the checkout on sys.path."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ddk.cli import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool("config-reference", sys.argv[1:]))
