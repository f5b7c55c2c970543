"""What the CPU backend's torch function mode (megatron_ddk/parallel/cpu.py) costs per torch call.

    OMP_NUM_THREADS=1 python bench/cpu_mode_overhead.py            # ~20 s on 2 cores
    OMP_NUM_THREADS=1 python bench/cpu_mode_overhead.py --repeats 5

Every torch function call made while the backend is active goes through
_CudaToCpuMode.__torch_function__ (a Python frame that inspects the arguments for CUDA devices).
This measures, in one process, with the mode off and on (cpu.activate() / cpu.deactivate(), best of
--repeats runs each, alternating):

1. per-call cost on ops small enough that dispatch dominates (add of two 8-element tensors, a
   view, a 64x64 matmul) and on a bigger op (a 512x512 matmul), in microseconds per call;
2. a tiny Megatron-Core GPTModel (the tests' student shape) forward + backward: the number of
   torch calls the mode intercepts per step (counted by a second mode stacked on top), and that
   count times the measured per-call overhead, against the step's wall time.

The GPTModel needs the backend to run at all, so its step is timed with the mode on only; the
estimate of what the mode adds to it is (intercepted calls x per-call overhead of the small ops).
Prints a table and the ratio on vs off per op.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def micro_ops():
    """(name, fn, calls) of the per-call measurements."""
    a, b = torch.randn(8), torch.randn(8)
    m, n = torch.randn(64, 64), torch.randn(64, 64)
    big1, big2 = torch.randn(512, 512), torch.randn(512, 512)
    return [("add, 8 elements", lambda: torch.add(a, b), 20000),
            ("Tensor.view", lambda: a.view(2, 4), 20000),
            ("matmul 64x64", lambda: m @ n, 5000),
            ("matmul 512x512", lambda: big1 @ big2, 50)]


def measure_micro(repeats: int):
    """{name: (us off, us on)} best of `repeats`, alternating off/on."""
    from megatron_ddk.parallel import cpu

    best = {}
    for _ in range(repeats):
        for name, fn, calls in micro_ops():
            off = _per_call_us(fn, calls)
            cpu.activate()
            try:
                on = _per_call_us(fn, calls)
            finally:
                cpu.deactivate()
            prev = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(prev[0], off), min(prev[1], on))
    return best


class _Counter(TorchFunctionMode):
    """Counts the torch function calls that reach the modes below it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def measure_model(repeats: int):
    """(intercepted calls per step, best step seconds) of a tiny GPTModel forward + backward."""
    from megatron_ddk.config.schema import ModelConfig
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.parallel import destroy, initialize
    from megatron_ddk.testing.tiny_run import STUDENT

    ctx = initialize(seed=1)
    try:
        model = build_gpt_model(ModelConfig(**STUDENT), ctx, 512)
        tokens = torch.randint(0, 512, (2, 32))
        pos = torch.arange(32).expand(2, 32)

        def step():
            model.zero_grad(set_to_none=True)
            model(tokens, pos, None).float().sum().backward()

        step()
        with _Counter() as counter:
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return counter.calls, min(times)
    finally:
        destroy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    micro = measure_micro(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); best of "
          f"{args.repeats}\n")
    print("| op | mode off (us/call) | mode on (us/call) | added (us/call) | on / off |")
    print("|---|---|---|---|---|")
    for name, (off, on) in micro.items():
        print(f"| {name} | {off:.2f} | {on:.2f} | {on - off:.2f} | {on / off:.2f}x |")
    small = [on - off for name, (off, on) in micro.items() if "512" not in name]
    added_us = sum(small) / len(small)
    calls, step_s = measure_model(args.repeats)
    share = calls * added_us * 1e-6 / step_s
    print(f"\ntiny GPTModel (tests' student, batch 2 x 32) forward + backward: {calls} torch calls "
          f"through the mode per step, step {1000 * step_s:.1f} ms; estimated mode cost "
          f"{calls} x {added_us:.2f} us = {calls * added_us / 1000:.2f} ms ({100 * share:.1f}% "
          f"of the step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
