"""Workarounds for Megatron-Core 0.16 (0.16.1 measured) with torch's Adam (no apex / TE).

Each workaround is tied to the Megatron-Core symbol it depends on; when the symbol is gone the
workaround raises CompatError naming this version instead of skipping silently, and
tests/training/test_mcore_compat.py fails the day Megatron-Core changes the behaviour (fixed or
moved), so the workaround can be removed or adapted:

1. materialise_optimizer_state: dist_checkpointing loads the optimizer into existing state
   tensors, which a fresh torch Adam does not have yet: one zero-LR, zero-gradient step creates
   them (parameters unchanged).
2. step_tolerant_loading: DistributedOptimizer.load_parameter_state_from_fully_reshardable
   copies every per-parameter state key through the private
   DistributedOptimizer._set_main_param_and_optimizer_states, but the checkpoint carries torch
   Adam's 'step' only in the param groups: KeyError 'step'. The method is wrapped to hide 'step'
   while each parameter's tensors are copied.
3. restore_adam_steps: DistributedOptimizer.load_state_dict (without apex/TE) puts ONE 'step'
   tensor, taken from the param groups, into every parameter's state; torch Adam's in-place
   `step += 1` then advances it once per parameter per optimizer step (measured: 2 + 2 x N
   after two more steps with N parameters, instead of 4), which breaks Adam's bias correction.
   Each parameter gets its own tensor with the checkpoint's step.

Imports torch and megatron.core lazily; nothing from megatron_ddk.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

MCORE_VERSION = "0.16"
"""The Megatron-Core release these workarounds were written and measured against."""

PATCHED_METHOD = "_set_main_param_and_optimizer_states"
"""The private DistributedOptimizer method step_tolerant_loading wraps."""

_warned = []


class CompatError(RuntimeError):
    """A Megatron-Core symbol a workaround relies on has changed."""


def check_version() -> str:
    """The installed Megatron-Core version; warns once when it is not MCORE_VERSION.x."""
    from megatron.core import package_info

    version = package_info.__version__
    if not version.startswith(MCORE_VERSION + ".") and not _warned:
        _warned.append(version)
        logger.warning("megatron-core %s is installed; training/mcore_compat.py's checkpoint "
                       "workarounds were measured with %s.x: run tests/training/"
                       "test_mcore_compat.py", version, MCORE_VERSION)
    return version


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def materialise_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam its state (every tensor and 'step') without changing a parameter."""
    for opt in _inner_optimizers(optimizer):
        inner = opt.optimizer
        if all(len(inner.state[p]) for g in inner.param_groups for p in g["params"]):
            continue
        saved = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        with torch.no_grad():
            for g in inner.param_groups:
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
        inner.zero_grad(set_to_none=True)
        for g, lr in zip(inner.param_groups, saved):
            g["lr"] = lr


def restore_adam_steps(optimizer) -> None:
    """Give every parameter its own 'step' tensor holding the checkpoint's Adam step count
    (from the param groups), replacing the one tensor Megatron-Core shares between them."""
    for opt in _inner_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _distributed(optimizer) -> list:
    """The DistributedOptimizers inside `optimizer` (a plain optimizer needs no patch)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    found = [o for o in _inner_optimizers(optimizer) if isinstance(o, DistributedOptimizer)]
    for opt in found:
        if not callable(getattr(type(opt), PATCHED_METHOD, None)):
            raise CompatError(
                f"megatron-core {check_version()}: DistributedOptimizer.{PATCHED_METHOD} is gone; "
                f"megatron_ddk/training/mcore_compat.py (written for {MCORE_VERSION}) must be "
                f"adapted before fully_reshardable optimizer checkpoints can load")
    return found


@contextlib.contextmanager
def step_tolerant_loading(optimizer):
    """While active, the distributed optimizer's per-parameter state copy skips torch Adam's
    'step' (restore_adam_steps sets it afterwards)."""
    patched = []
    for opt in _distributed(optimizer):
        original = getattr(opt, PATCHED_METHOD)

        def without_step(model_param, tensors, _opt=opt, _original=original):
            gi, go = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[gi]["params"][go]]
            step = state.pop("step", None)
            try:
                _original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        setattr(opt, PATCHED_METHOD, without_step)
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            delattr(opt, PATCHED_METHOD)  # back to the class method
