"""Full training checkpoints: student weights, distributed optimizer, scheduler, RNG, run state.

Layout and crash safety come from models/checkpoint.py (iter_NNNNNNN/ renamed into place, the
latest-iteration file replaced last). The teacher is never written: it is reloaded from
distill.teacher_load at every start. The run state (step, consumed samples, the DDK controller
with its teacher-loss cache and weight history, the mixture's cursors and position, the
scheduler) is common state; the optimizer is saved fully_reshardable so a checkpoint resumes at
another TP / PP / DP layout; RNG states are saved per rank and restored only at the same layout.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Optional

import torch

from megatron_ddk.config.optional import have_cuda
from megatron_ddk.models.checkpoint import (check_compatible, load_sharded, read_metadata,
                                            resolve_checkpoint, save_sharded)

logger = logging.getLogger(__name__)

# fully_reshardable: a checkpoint resumes at any TP / PP / DP (dp_reshardable only changes DP)
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rng_object(ctx, state: Optional[Dict[str, Any]]):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (ctx.world_size,), (ctx.rank,), replica_id=0)


def _rng_state() -> Dict[str, Any]:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if have_cuda() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and have_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state to load into: take one zero-gradient, zero-LR step
    (parameters unchanged) so every state tensor and 'step' exists, as dist_checkpointing needs."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
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


def _restore_adam_steps(optimizer) -> None:
    """Put the checkpoint's Adam step count into every parameter's state.

    With torch's Adam (no apex/TE), Megatron-Core 0.16's DistributedOptimizer stores the step in
    the param groups; on load into an optimizer whose state already exists the per-parameter
    'step' tensors keep their old value (measured: 1 after a resume at step 3), which changes the
    bias correction. Each parameter gets its own tensor (a shared one would be incremented once
    per parameter by torch's in-place `step += 1`)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


@contextlib.contextmanager
def _step_tolerant_loading(optimizer):
    """Megatron-Core 0.16's fully_reshardable load copies every per-parameter optimizer state key
    from the checkpoint, but skips torch Adam's 'step' there (it is restored from the param
    groups), so loading fails with KeyError 'step' without apex/TE. Hide 'step' while each
    parameter's tensors are copied; _restore_adam_steps sets it afterwards."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def without_step(model_param, tensors, _opt=opt, _original=original):
            gi, go = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[gi]["params"][go]]
            step = state.pop("step", None)
            try:
                _original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = without_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method


def layout(ctx) -> Dict[str, int]:
    """The parallel layout recorded with a checkpoint."""
    return {"world_size": ctx.world_size, "tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}


def save_training_checkpoint(root: str, iteration: int, *, model, optimizer, ctx,
                             run_state: Dict[str, Any], metadata: Dict[str, Any],
                             config_yaml: str, keep_last: Optional[int]) -> str:
    """Write DIR/iter_N with everything needed to continue exactly; all ranks call it.

    `model` is the student's stage (never the pair: the teacher is not saved)."""
    model_sd = model.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=SHARDING),
        "rng_state": _rng_object(ctx, _rng_state()),
        "run_state": run_state,
        "iteration": iteration,
        "checkpoint_version": 3.0,
    }
    meta = dict(metadata, layout=layout(ctx), kind="training")
    return save_sharded(root, iteration, state, meta, config_yaml, keep_last)


def load_training_checkpoint(path: str, *, model, optimizer, ctx, model_dict: Dict[str, Any],
                             padded_vocab_size: int, tokenizer_hash: Optional[str],
                             finetune: bool = False) -> Optional[Dict[str, Any]]:
    """Load a checkpoint into model (+ optimizer, RNG); returns its run state (None: finetune
    or a model-only checkpoint, i.e. start at step 0 from these weights)."""
    folder, iteration = resolve_checkpoint(path)
    meta = read_metadata(folder)
    check_compatible(meta, model_dict, padded_vocab_size, tokenizer_hash, path)
    full = meta.get("kind") == "training" and not finetune
    request: Dict[str, Any] = {"model": model.sharded_state_dict()}
    same_layout = meta.get("layout") == layout(ctx)
    if full:
        _materialise_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model.sharded_state_dict(),
                                                            is_loading=True, metadata=SHARDING)
        if same_layout:
            request["rng_state"] = _rng_object(ctx, None)
    loaded = load_sharded(folder, request)
    model.load_state_dict(loaded["model"], strict=True)
    if not full:
        logger.info("loaded model weights from %s (iteration %d); starting at step 0", folder,
                    iteration)
        return None
    with torch.no_grad(), _step_tolerant_loading(optimizer):  # copies into views of leaves
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        logger.warning("checkpoint layout %s differs from this run's %s: weights, optimizer and "
                       "run state resharded; RNG streams restart from the seed", meta.get("layout"),
                       layout(ctx))
    logger.info("resumed from %s (iteration %d)", folder, iteration)
    return loaded["run_state"]
