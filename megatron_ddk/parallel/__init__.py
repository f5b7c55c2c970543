"""Distributed start-up and the explicit parallel context handed to models and losses.

The names below are imported on first use (PEP 562), so `megatron_ddk.parallel.launcher` can be
read without importing torch."""

from typing import Any

__all__ = ["ParallelContext", "destroy", "initialize"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from megatron_ddk.parallel import state

        return getattr(state, name)
    raise AttributeError(f"module 'megatron_ddk.parallel' has no attribute {name!r}")
