"""Full training checkpoints: student weights, distributed optimizer, scheduler, RNG, run state.

Layout and crash safety come from models/checkpoint.py (iter_NNNNNNN/ renamed into place, the
latest-iteration file replaced last). The teacher is never written: it is reloaded from
distill.teacher_load at every start. The run state (step, consumed samples, the DDK controller
with its teacher-loss cache and weight history, the mixture's cursors and position, the
scheduler) is common state; the optimizer is saved fully_reshardable so a checkpoint resumes at
another TP / PP / DP layout; RNG states are saved per rank and restored only at the same layout.
Megatron-Core 0.16's optimizer-loading quirks are handled in mcore_compat.py.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

import torch

from megatron_ddk.config.optional import have_cuda
from megatron_ddk.models.checkpoint import (
    ResolvedCheckpoint,
    check_compatible,
    describe_checkpoint,
    load_sharded,
    save_sharded,
)
from megatron_ddk.training.mcore_compat import (
    check_version,
    materialise_optimizer_state,
    restore_adam_steps,
    step_tolerant_loading,
)

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


def load_training_checkpoint(path: Union[str, ResolvedCheckpoint], *, model, optimizer, ctx,
                             model_dict: Dict[str, Any], padded_vocab_size: int,
                             tokenizer_hash: Optional[str],
                             finetune: bool = False) -> Optional[Dict[str, Any]]:
    """Load a checkpoint (a path, or the run's ResolvedCheckpoint: not read again) into model
    (+ optimizer, RNG); returns its run state (None: finetune or a model-only checkpoint, i.e.
    start at step 0 from these weights)."""
    ckpt = describe_checkpoint(path)
    folder, iteration, meta, path = ckpt.folder, ckpt.iteration, ckpt.metadata, ckpt.path
    check_compatible(meta, model_dict, padded_vocab_size, tokenizer_hash, path)
    full = meta.get("kind") == "training" and not finetune
    request: Dict[str, Any] = {"model": model.sharded_state_dict()}
    same_layout = meta.get("layout") == layout(ctx)
    if full:
        check_version()
        materialise_optimizer_state(optimizer)
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
    with torch.no_grad(), step_tolerant_loading(optimizer):  # copies into views of leaves
        optimizer.load_state_dict(loaded["optimizer"])
    restore_adam_steps(optimizer)
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        logger.warning("checkpoint layout %s differs from this run's %s: weights, optimizer and "
                       "run state resharded; RNG streams restart from the seed", meta.get("layout"),
                       layout(ctx))
    logger.info("resumed from %s (iteration %d)", folder, iteration)
    return loaded["run_state"]
