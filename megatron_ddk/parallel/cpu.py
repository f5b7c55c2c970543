"""The one place that lets Megatron-Core run on a CPU-only host.

Megatron-Core assumes CUDA in a handful of ways (measured, see docs/cpu_backend.md):

1. ``torch.cuda.current_device()` used as a device argument (~175 sites);
2. unconditional ``torch.cuda.synchronize` / ``empty_cache` / ``current_stream` / ``stream``;
3. the CUDA RNG tracker (``tensor_parallel.random``) reading CUDA generator states;
4. hard-coded ``device="cuda"` / ``.cuda()` / ``.to("cuda")` / ``pin_memory()` sites;
5. optimizer and grad-clipping checks of ``param.type() == 'torch.cuda.FloatTensor'``.

:func:`activate` covers all five: a small set of ``torch.cuda` stand-ins, a torch function mode
that maps CUDA device arguments to the CPU, and an RNG tracker with real per-name streams on the
CPU generator (so tensor-parallel ranks get different dropout streams and activation recompute
replays the same numbers). It is called only by :func:`megatron_ddk.parallel.initialize` and only
when CUDA is absent; nothing else in the code base special-cases the CPU.

Every attribute it replaces (on ``torch.cuda``, ``torch.cuda.nvtx` and Megatron-Core's
``tensor_parallel.random``, including its global tracker) is saved first; :func:`deactivate`
(called by :func:`megatron_ddk.parallel.destroy`) leaves the function mode and puts every original
back, so a process can activate and deactivate the backend any number of times.
bench/cpu_mode_overhead.py measures what the function mode costs per torch call
(docs/cpu_backend.md).

This module must not import anything from megatron_ddk.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ACTIVE = False
_MODE = None
_SAVED: list = []
"""(object, attribute name, original value) of every attribute activate() replaced."""

# Megatron-Core internals this module replaces or relies on. tests/parallel/test_cpu_backend.py
# checks that each still exists, so an upgrade that moves one fails loudly and names it.
COVERED_SYMBOLS = (
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.tensor_parallel.random.initialize_rng_tracker",
    "megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed",
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params",
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
    "megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining",
    "megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync",
)

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def is_active() -> bool:
    """True once :func:`activate` has run in this process."""
    return _ACTIVE


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in torch's device arguments
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to the CPU and answers CUDA type checks for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.is_pinned:
            return True
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for a CUDA stream: every operation is already ordered on the CPU."""

    def wait_stream(self, _stream):
        return None

    def wait_event(self, _event):
        return None

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        return None

    def query(self):
        return True


class _CpuEvent:
    """Stand-in for a CUDA event."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


def _replace(obj, name: str, value) -> None:
    """Set obj.name = value, remembering the original for deactivate()."""
    _SAVED.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    stream = _CpuStream()
    stand_ins = {
        "current_device": lambda: 0,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "current_stream": lambda *a, **k: stream,
        "default_stream": lambda *a, **k: stream,
        "Stream": lambda *a, **k: _CpuStream(),
        "Event": _CpuEvent,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_device": lambda *a, **k: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        "manual_seed": lambda seed: None,
    }
    for name, value in stand_ins.items():
        _replace(cuda, name, value)
    _replace(cuda.nvtx, "range_push", lambda *a, **k: None)
    _replace(cuda.nvtx, "range_pop", lambda *a, **k: None)


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG streams, kept as CPU generator states.

        Entering ``fork(name)` swaps the process's CPU generator to that stream and saves it
        back on exit, so a tensor-parallel rank draws from its own stream exactly as it would on
        a GPU, and activation recompute can replay a stream.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CpuRNGStatesTracker


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _replace(mrandom, "CudaRNGStatesTracker", _cpu_rng_tracker_class())
    _replace(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # the global tracker and its flag: initialize_rng_tracker(force_reset=True) replaces both
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"):
        _SAVED.append((mrandom, name, getattr(mrandom, name)))
    mrandom.initialize_rng_tracker(force_reset=True)


def activate() -> None:
    """Make Megatron-Core usable on this CPU-only process (idempotent).

    Raises:
        RuntimeError: if CUDA is available; the CPU backend must never shadow a real GPU.
    """
    global _ACTIVE, _MODE
    if _ACTIVE:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_ddk.parallel.cpu.activate() called on a host with CUDA")
    try:
        _patch_torch_cuda()
        _patch_rng_tracker()
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
    except BaseException:
        _restore()
        raise
    _ACTIVE = True
    logger.info("CPU backend active: Megatron-Core runs on the CPU with gloo")


def _restore() -> None:
    while _SAVED:
        obj, name, value = _SAVED.pop()
        setattr(obj, name, value)


def deactivate() -> None:
    """Undo :func:`activate`: leave the function mode, restore every replaced attribute.

    A no-op when the backend is not active. Megatron-Core objects built while it was active
    (models, optimizers, the RNG tracker's streams) must not be used afterwards on this host.

    Raises:
        RuntimeError: another torch function mode was entered after activate() and is still
            active; leave it first (modes form a stack).
    """
    global _ACTIVE, _MODE
    if not _ACTIVE:
        return
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    if not stack or stack[-1] is not _MODE:
        raise RuntimeError("megatron_ddk.parallel.cpu.deactivate(): another torch function mode "
                           f"was entered after the CPU backend ({stack[-1] if stack else None!r}) "
                           "and is still active; exit it first")
    _MODE.__exit__(None, None, None)
    _MODE = None
    _restore()
    _ACTIVE = False
    logger.info("CPU backend deactivated: torch.cuda and Megatron-Core's RNG module restored")
