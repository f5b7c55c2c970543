"""The CPU backend: every Megatron-Core internal it covers still exists, and its RNG streams
work."""

import importlib

import pytest
import torch

from megatron_ddk.parallel import cpu
from megatron_ddk.testing import run_distributed


@pytest.mark.parametrize("symbol", cpu.COVERED_SYMBOLS)
def test_covered_megatron_symbols_exist(symbol):
    module, _, name = symbol.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"Megatron-Core moved {module} (needed by megatron_ddk/parallel/cpu.py): {exc}")
    assert hasattr(mod, name), f"Megatron-Core no longer has {symbol}; update parallel/cpu.py"


def rng_streams(rank, world):
    from megatron.core import tensor_parallel

    from megatron_ddk.parallel import initialize

    initialize(tensor_model_parallel_size=2, seed=11)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    assert torch.equal(before, torch.get_rng_state()), "fork must restore the default stream"
    default = torch.rand(4)
    # device arguments that name CUDA land on the CPU
    x = torch.zeros(2, device=torch.cuda.current_device())
    y = torch.ones(2).cuda()
    assert x.device.type == "cpu" and y.device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    return a, b, default


def test_rng_tracker_gives_each_tp_rank_its_own_stream():
    (a0, b0, d0), (a1, b1, d1) = run_distributed(rng_streams, 2)
    assert not torch.equal(a0, a1), "tensor-parallel ranks must draw different dropout masks"
    assert not torch.equal(a0, b0), "a stream must advance between forks"
    assert torch.equal(d0, d1), "the default (data-parallel) stream is shared across TP ranks"
    expected = torch.Generator().manual_seed(11 + 2718)
    assert torch.equal(a0, torch.rand(4, generator=expected)), "TP rank 0 stream = seed + 2718"
