"""Start torch.distributed and Megatron-Core's process groups; return one explicit object.

`initialize()` reads torchrun / SLURM variables (a single process without a launcher works too),
makes a launched rank exit when its launcher dies and its helpers die with it (lifeline.py),
picks NCCL on GPU and gloo on CPU (activating the CPU backend, parallel/cpu.py, only when CUDA is
absent), creates Megatron-Core's groups, seeds every RNG per rank, and returns a ParallelContext
holding Megatron-Core's ProcessGroupCollection. The student, the teacher and the loss all receive
that object; nothing downstream reads parallel_state globals.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.config.optional import have_cuda
from megatron_ddk.lifeline import children_die_with_this_process, exit_with_launcher
from megatron_ddk.parallel.launcher import launcher_env

logger = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    """The parallel layout of this process, with its process groups."""

    pg_collection: object
    """Megatron-Core ProcessGroupCollection (tp, pp, dp, dp_cp, mp, embd, pos_embd, cp, ...)."""

    rank: int
    """Global rank."""

    world_size: int
    """Number of ranks."""

    tp_size: int
    """Tensor-parallel size."""

    pp_size: int
    """Pipeline-parallel size."""

    dp_size: int
    """Data-parallel size."""

    tp_rank: int
    """Rank within the tensor-parallel group."""

    pp_rank: int
    """Pipeline stage of this rank."""

    dp_rank: int
    """Rank within the data-parallel group."""

    device: torch.device
    """Device the models live on (cuda:LOCAL_RANK, or cpu)."""

    backend: str
    """torch.distributed backend in use (nccl or gloo)."""

    @property
    def tp_group(self):
        """Tensor-parallel process group."""
        return self.pg_collection.tp

    @property
    def pp_group(self):
        """Pipeline-parallel process group."""
        return self.pg_collection.pp

    @property
    def dp_group(self):
        """Data-parallel process group."""
        return self.pg_collection.dp

    @property
    def is_first_stage(self) -> bool:
        """True on the first pipeline stage."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that logs and writes run files: last stage, TP rank 0, DP rank 0."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


_launcher_env = launcher_env  # the launcher's (rank, world_size, local_rank)


def _start_process_group(backend: str, timeout_minutes: int) -> None:
    rank, world_size, _ = _launcher_env()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise RuntimeError("MASTER_PORT is not set: launch with torchrun or "
                               "scripts/slurm_distill.sbatch, which set it")
        from megatron_ddk.parallel.ports import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def seed_everything(seed: int, pp_rank: int, dp_rank: int = 0) -> None:
    """Seed python, numpy, torch and Megatron's named RNG streams for this rank.

    Like Megatron-LM, the base seed differs per pipeline stage (each stage initialises different
    layers); the tensor-parallel stream differs per TP rank inside model_parallel_cuda_manual_seed.
    """
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def initialize(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               seed: int = 1234, backend: str = "auto",
               timeout_minutes: int = 10) -> ParallelContext:
    """Start torch.distributed and Megatron-Core's groups; seed RNGs; return the context.

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size.
        seed: run seed.
        backend: 'auto' (nccl with CUDA, gloo without), 'nccl' or 'gloo'.
        timeout_minutes: collective timeout.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    exit_with_launcher()  # a rank must not outlive a SIGKILLed torchrun / srun (lifeline.py)
    children_die_with_this_process()  # nor its checkpoint writers outlive the rank
    use_cuda = have_cuda()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(_launcher_env()[2])
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        from megatron_ddk.parallel import cpu

        cpu.activate()
        device = torch.device("cpu")
    if not dist.is_initialized():
        _start_process_group(backend, timeout_minutes)
    world = dist.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % mp:
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size="
                         f"{tensor_model_parallel_size} x pipeline_model_parallel_size="
                         f"{pipeline_model_parallel_size}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    ctx = ParallelContext(
        pg_collection=pgs, rank=dist.get_rank(), world_size=world,
        tp_size=tensor_model_parallel_size, pp_size=pipeline_model_parallel_size,
        dp_size=world // mp, tp_rank=dist.get_rank(pgs.tp), pp_rank=dist.get_rank(pgs.pp),
        dp_rank=dist.get_rank(pgs.dp), device=device, backend=backend)
    seed_everything(seed, ctx.pp_rank, ctx.dp_rank)
    logger.info("parallel: world=%d tp=%d pp=%d dp=%d backend=%s", world, ctx.tp_size,
                ctx.pp_size, ctx.dp_size, backend)
    return ctx


def destroy() -> None:
    """Tear down Megatron-Core's groups and the default process group; deactivate the CPU
    backend if initialize() activated it (torch.cuda and Megatron's RNG module restored)."""
    from megatron.core import parallel_state

    from megatron_ddk.parallel import cpu

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu.deactivate()
