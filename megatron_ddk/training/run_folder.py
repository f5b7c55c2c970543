"""What a training run may do with its checkpoint.save folder, decided before anything is built.

    checkpoint.load: auto     -> resume from checkpoint.save when it holds a checkpoint, else fresh
    save folder holds checkpoints and the run does not resume from it -> refused, unless
        checkpoint.overwrite: true (a fresh rerun of a config would otherwise restart at step 0
        and rewind latest_checkpointed_iteration.txt; another run's or the teacher's folder
        would be overwritten and pruned)
    checkpoint.save is distill.teacher_load -> refused unless overwrite, resume or not

Every checkpoint records the id of the run that wrote it (`run_id` in megatron_ddk.json): a run
that resumes takes over the id of the checkpoint it resumes from, a fresh or fine-tuning run gets
a new one, and checkpoint.keep_last prunes only iterations with the run's own id
(models/checkpoint_layout.prune_checkpoints). Reads files only; imports config and
models/checkpoint_layout (no torch).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import List, Optional

from megatron_ddk.config.loader import ConfigError
from megatron_ddk.config.schema import RunConfig
from megatron_ddk.config.validate import train_iters
from megatron_ddk.models.checkpoint_layout import (
    SHAPE_FIELDS,
    CheckpointError,
    ResolvedCheckpoint,
    checkpoint_root,
    complete_iterations,
    describe_checkpoint,
    model_differences,
    read_latest_iteration,
    read_metadata,
    resolve_checkpoint,
)

LOAD_AUTO = "auto"


def resolve_load(cfg: RunConfig) -> RunConfig:
    """cfg with checkpoint.load: auto replaced by checkpoint.save (it holds a checkpoint) or
    None."""
    c = cfg.checkpoint
    if c.load != LOAD_AUTO:
        return cfg
    if not c.save:
        raise ConfigError("checkpoint.load=auto resumes from checkpoint.save, which is not set; "
                          "set checkpoint.save or give the folder to resume from")
    load = c.save if read_latest_iteration(c.save) is not None else None
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(c, load=load))


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _holdings(save: str) -> Optional[str]:
    """What the save folder holds ('iterations [3, 6] (latest 6)'), None when no checkpoint."""
    try:
        latest = read_latest_iteration(save)
    except CheckpointError:
        latest = -1
    iters = complete_iterations(save)
    if latest is None and not iters:
        return None
    named = "" if latest is None else f" (latest {'unreadable' if latest == -1 else latest})"
    return f"iterations {iters}{named}"


def _other_model(save: str, cfg: RunConfig) -> str:
    """' of another model (hidden_size: ...)' when the save folder's newest checkpoint records
    a model of another shape, else ''."""
    try:
        folder, _ = resolve_checkpoint(save)
        saved = read_metadata(folder).get("model") or {}
    except CheckpointError:
        return ""
    diffs = model_differences(saved, dataclasses.asdict(cfg.model), SHAPE_FIELDS)
    return f" of another model ({'; '.join(diffs)})" if diffs else ""


def save_folder_errors(cfg: RunConfig) -> List[str]:
    """Why this training run must not write into checkpoint.save (empty when it may)."""
    c, d = cfg.checkpoint, cfg.distill
    if not c.save or c.overwrite:
        return []
    if d.teacher_load and os.path.exists(d.teacher_load) and \
            _same(checkpoint_root(d.teacher_load), c.save):
        return [f"checkpoint.save={c.save} is the teacher's checkpoint folder "
                f"(distill.teacher_load={d.teacher_load}): this run would overwrite (and "
                f"keep_last could prune) the teacher; choose another checkpoint.save (or set "
                f"checkpoint.overwrite=true)"]
    held = _holdings(c.save)
    if held is None:
        return []
    if c.load and os.path.exists(c.load) and _same(checkpoint_root(c.load), c.save):
        return []  # resuming (or fine-tuning) from this very folder
    what = f"checkpoint.save={c.save} already holds checkpoints{_other_model(c.save, cfg)}: {held}"
    if not c.load:
        return [f"{what}, and this run starts fresh (no --load): it would restart at step 0 "
                f"and overwrite them. Resume with --load {c.save} (or checkpoint.load=auto), "
                f"choose another checkpoint.save, or set checkpoint.overwrite=true to start "
                f"over in this folder"]
    return [f"{what}, but this run loads {c.load}: it would overwrite them. Choose another "
            f"checkpoint.save, resume from this folder with --load {c.save}, or set "
            f"checkpoint.overwrite=true"]


def resume_errors(cfg: RunConfig, resume: Optional[ResolvedCheckpoint] = None) -> List[str]:
    """A full resume from a checkpoint already past the run's last step (it would be saved
    again under its own iteration, with this config, rewriting a finished checkpoint).
    `resume`: checkpoint.load already resolved (None: resolve it here)."""
    c = cfg.checkpoint
    last = train_iters(cfg)
    if not c.load or c.finetune or last is None or not os.path.exists(c.load):
        return []
    try:
        resume = resume or describe_checkpoint(c.load)
    except CheckpointError:
        return []  # the load reports it, naming the file
    folder, iteration = resume.folder, resume.iteration
    if iteration <= last:
        return []
    return [f"checkpoint.load={c.load} is at iteration {iteration} ({folder}), past this run's "
            f"last step (train.train_iters={last}): nothing to train, and the end-of-run save "
            f"would rewrite that checkpoint. Raise train.train_iters above {iteration} to "
            f"continue, or set checkpoint.finetune=true to start a new run from its weights"]


def check_save_folder(cfg: RunConfig, resume: Optional[ResolvedCheckpoint] = None
                      ) -> RunConfig:
    """Raise ConfigError when the run must not write into checkpoint.save (or would rewrite
    the checkpoint it resumes from, `resume` when already resolved); return cfg."""
    errs = save_folder_errors(cfg) + resume_errors(cfg, resume)
    if errs:
        raise ConfigError("refusing to write checkpoints:\n  - " + "\n  - ".join(errs))
    return cfg


def run_id(cfg: RunConfig, resume: Optional[ResolvedCheckpoint] = None) -> str:
    """The id this run writes into its checkpoints: the resumed checkpoint's (a full resume of a
    training checkpoint that records one; `resume` when already resolved), otherwise a new
    one."""
    c = cfg.checkpoint
    if c.load and not c.finetune:
        try:
            meta = (resume or describe_checkpoint(c.load)).metadata
        except CheckpointError:
            meta = {}
        if meta.get("kind") == "training" and meta.get("run_id"):
            return str(meta["run_id"])
    return uuid.uuid4().hex
