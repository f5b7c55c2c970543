"""Test helpers that ship with the package (multi-process CPU runs with gloo)."""

from megatron_ddk.testing.multiproc import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
