"""Distributed start-up and the explicit parallel context handed to models and losses."""

from megatron_ddk.parallel.state import ParallelContext, destroy, initialize

__all__ = ["ParallelContext", "destroy", "initialize"]
