"""The CPU backend is reversible: parallel.destroy() deactivates it and every original comes back.

Runs in a spawned process (megatron_ddk.testing.multiproc, world 1) so the pytest process never
holds the patches. The originals are captured before the first initialize() and compared by
identity afterwards; a CUDA device argument must fail again once the function mode is gone, and a
second initialize() / destroy() cycle must work the same way.
"""

import pytest
import torch

from megatron_ddk.testing import run_distributed

PATCHED_CUDA = ("current_device", "synchronize", "empty_cache", "current_stream", "Stream",
                "Event", "stream", "set_device", "get_rng_state", "set_rng_state", "manual_seed")
PATCHED_RNG = ("CudaRNGStatesTracker", "_get_cuda_rng_state", "_set_cuda_rng_state",
               "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")


def _originals():
    from megatron.core.tensor_parallel import random as mrandom

    cuda = {n: getattr(torch.cuda, n) for n in PATCHED_CUDA}
    cuda["nvtx.range_push"] = torch.cuda.nvtx.range_push
    return cuda, {n: getattr(mrandom, n) for n in PATCHED_RNG}


def _cuda_argument_fails() -> bool:
    try:
        torch.zeros(1, device="cuda")
    except (RuntimeError, AssertionError):
        return True
    return False


def lifecycle(rank, world):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_ddk.parallel import cpu, destroy, initialize

    cuda_before, rng_before = _originals()
    report = {"fails_before": _cuda_argument_fails()}
    for cycle in range(2):
        initialize(seed=5)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(2)
        report[f"active_{cycle}"] = cpu.is_active()
        report[f"patched_{cycle}"] = torch.cuda.current_device is not cuda_before["current_device"]
        report[f"tracker_{cycle}"] = type(mrandom.get_cuda_rng_tracker()).__name__
        report[f"works_{cycle}"] = torch.zeros(1, device="cuda").device.type
        destroy()
        cuda_after, rng_after = _originals()
        report[f"cuda_restored_{cycle}"] = [n for n in cuda_before
                                            if cuda_after[n] is not cuda_before[n]]
        report[f"rng_restored_{cycle}"] = [n for n in rng_before
                                           if rng_after[n] is not rng_before[n]]
        report[f"inactive_{cycle}"] = not cpu.is_active()
        report[f"fails_after_{cycle}"] = _cuda_argument_fails()
    cpu.deactivate()  # a no-op when not active
    # another function mode entered after activate() must be left first
    from torch.overrides import TorchFunctionMode

    cpu.activate()
    with TorchFunctionMode():
        try:
            cpu.deactivate()
            report["refused_under_other_mode"] = False
        except RuntimeError as exc:
            report["refused_under_other_mode"] = "another torch function mode" in str(exc)
    cpu.deactivate()
    report["final_inactive"] = not cpu.is_active() and _cuda_argument_fails()
    return report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend is for hosts without CUDA")
def test_destroy_deactivates_the_cpu_backend_and_restores_every_original():
    (r,) = run_distributed(lifecycle, 1, timeout=300)
    assert r["fails_before"], "this test needs a host without CUDA"
    for cycle in (0, 1):
        assert r[f"active_{cycle}"] and r[f"patched_{cycle}"]
        assert r[f"tracker_{cycle}"] == "CpuRNGStatesTracker"
        assert r[f"works_{cycle}"] == "cpu"
        assert r[f"cuda_restored_{cycle}"] == [], "torch.cuda attributes left patched"
        assert r[f"rng_restored_{cycle}"] == [], "Megatron RNG module attributes left patched"
        assert r[f"inactive_{cycle}"] and r[f"fails_after_{cycle}"]
    assert r["refused_under_other_mode"] and r["final_inactive"]


def test_free_port_lives_in_parallel():
    import socket

    from megatron_ddk.parallel.ports import free_port
    from megatron_ddk.testing import multiproc

    assert multiproc.free_port is free_port  # one helper; production does not import testing/
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
