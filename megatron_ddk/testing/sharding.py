"""Reference slicing for tests: a TP=1 tensor cut the way Megatron shards a parameter.

Tests compare a tensor-parallel rank's parameters or gradients with a single-process reference;
this is the independent statement of Megatron-Core's layout (column/row splits along
param.partition_dim; a gated MLP's fc1 holds [gate shard; up shard] on each rank).
"""

from __future__ import annotations

import torch


def tp_shard(name: str, full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int,
             tp_size: int, gated_mlp: bool = True) -> torch.Tensor:
    """This TP rank's slice of `full`, the TP=1 value of the parameter called `name`."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if gated_mlp and "linear_fc1" in name:  # gate and up halves are split separately
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank],
                          up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]
