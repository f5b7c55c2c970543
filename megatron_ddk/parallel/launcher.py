"""Which process this is, from the launcher's environment (torchrun, else SLURM, else a single
process). Environment variables only: no torch, so a command can check a config for the world
it was launched in before anything heavy is imported."""

from __future__ import annotations

import os
from typing import Tuple


def launcher_env() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else SLURM, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0
