"""Shared pytest set-up: repo root importable, Megatron-Core's install-time warnings silenced,
and no process left behind (megatron_ddk.testing.leftovers fails the session otherwise)."""

import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")

pytest_plugins = ["megatron_ddk.testing.leftovers"]
