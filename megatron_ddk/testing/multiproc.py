"""Spawn N gloo ranks on this host, run one function in each, return every rank's result.

Used by the test-suite and by anyone checking a parallel layout on a laptop:

    results = run_distributed(my_check, world_size=4, timeout=300)

and, inside my_check(rank, world_size), tp_groups(rank, world_size) starts gloo and hands the rank
its group for every tensor-parallel size the world divides into (4 ranks: TP = 4, 2 and 1).

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free
port), so code under test starts torch.distributed exactly as it would under torchrun. When the
ranks outnumber the cores, OMP_NUM_THREADS=1 keeps them from thrashing. A rank that raises has
its traceback re-raised in the caller (naming the rank); a hard timeout kills all ranks. Several
checks should share one launch: start-up costs seconds per launch.

Ranks start from multiprocessing's fork server, which imports torch and Megatron-Core once
(PRELOAD) and forks every rank from that clean, never-computing process: a spawned interpreter
spends 7-10 s of CPU per rank on those imports (2-core box). MEGATRON_DDK_MP_START=spawn starts
every rank as a new interpreter instead, the default on a host with an NVIDIA driver.
This module imports nothing from megatron_ddk but the port helper (megatron_ddk.parallel.ports)
and pipeline.forked's module list and GPU-host check (both standard library only); the fork
server imports PRELOAD.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from megatron_ddk.parallel.ports import free_port
from megatron_ddk.pipeline.forked import WARM_MODULES, gpu_host

START_ENV = "MEGATRON_DDK_MP_START"
"""forkserver or spawn: how run_distributed starts its ranks (default: start_method())."""

PRELOAD = list(WARM_MODULES)
"""Imported once by the fork server before it forks: what the pipeline warms up (forked.py)."""


def start_method() -> str:
    """MEGATRON_DDK_MP_START, by default forkserver, or spawn on a host with an NVIDIA driver
    (CUDA does not survive a fork of a process that probed it)."""
    method = os.environ.get(START_ENV) or ("spawn" if gpu_host() else "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_ENV}={method!r}: use forkserver or spawn")
    return method


def context():
    """The multiprocessing context run_distributed (and testing.commands) start processes from."""
    method = start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(fn, rank, world_size, port, args, results, threads, environ):
    os.environ.clear()  # the caller's environment now, not the fork server's from its start
    os.environ.update(environ)
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
    })
    try:
        import torch

        torch.set_num_threads(threads)
        value = fn(rank, world_size, *args)
        results.put((rank, True, _to_bytes(value)))
    except BaseException:  # report anything, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        _teardown()


def _to_bytes(value) -> bytes:
    """Serialise a result with torch.save: tensors in a Queue would go through shared memory
    that disappears when the rank exits."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _teardown():
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:
        pass
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300,
                    threads: Optional[int] = None) -> List[Any]:
    """Run ``fn(rank, world_size, *args)` in `world_size` new processes (module docstring).

    Args:
        fn: a module-level (picklable) function.
        world_size: number of ranks.
        timeout: seconds for the whole launch; all ranks are killed past it.
        threads: torch threads per rank; default cores // world_size (at least 1).

    Returns:
        The per-rank return values, indexed by rank.

    Raises:
        RuntimeError: a rank failed (its traceback included) or the launch timed out.
    """
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // world_size)
    ctx = context()
    results = ctx.Queue()
    port = free_port()
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, daemon=False,
                         args=(fn, r, world_size, port, args, results, threads, environ))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
    finally:
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp
    values: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"run_distributed({getattr(fn, '__name__', fn)}): timed out "
                                   f"after {timeout:.0f} s; ranks done: {sorted(values)}")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in values
                        and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code "
                                       f"{procs[dead[0]].exitcode} and no traceback") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = _from_bytes(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]


def tp_groups(rank: int, world_size: int) -> Dict[int, Any]:
    """Start gloo in a run_distributed rank and return {tp: this rank's tensor-parallel group}.

    One group per divisor tp of world_size: the WORLD group for tp = world_size, otherwise the
    tp consecutive ranks [i * tp, (i + 1) * tp) that hold `rank` (so rank % tp is its TP rank).
    Every rank creates every group in the same order, as torch.distributed.new_group requires.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo")
    groups = {world_size: dist.group.WORLD}
    for tp in range(world_size - 1, 0, -1):
        if world_size % tp:
            continue
        for first in range(0, world_size, tp):
            members = list(range(first, first + tp))
            group = dist.new_group(members)
            if rank in members:
                groups[tp] = group
    return groups
