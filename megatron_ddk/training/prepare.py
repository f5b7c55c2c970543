"""One preparation of a run config, the same for every command that runs or checks one.

    prepare(config, overrides, training=True)       # train (a PreparedRun: config + checkpoints)
    prepare_run(config, overrides, training=True)   # check-config: the same checks, the config
    prepare_run(config, overrides)                  # eval, cache-teacher
    prepare_run(data, overrides, world_size=N, resolve_files=False, create_folders=False)
                                                    # the pipeline's plan check, before any stage

The steps: load the YAML (or take plain data) with its overrides, resolve the teacher from its
checkpoint (which must exist) and `checkpoint.load: auto` (resolve_files), resolve each checkpoint
the run reads once (the teacher's; for training the one it resumes from: folder, iteration and
metadata, carried to the builder and the loaders as ResolvedCheckpoint), run the static checks
for the launcher's world size (or `world_size`; launched=False without one: no world-size rules,
as check-config off the cluster), check the output folders (create_folders: create them and write
a probe file; otherwise change nothing and require the nearest existing folder to be writable),
and, for training, the save-folder guard. Host checks (GPU, Transformer Engine, optional
packages) are the caller's next step: they import torch.

Imports no torch and no Megatron-Core: a typo in a config is reported in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from megatron_ddk.atomic import check_writable_folder
from megatron_ddk.config import ConfigError, RunConfig, config_from_data, load_config, static_checks
from megatron_ddk.models.checkpoint_layout import (
    CheckpointError,
    ResolvedCheckpoint,
    describe_checkpoint,
)
from megatron_ddk.models.teacher_config import resolve_teacher
from megatron_ddk.parallel.launcher import launcher_env
from megatron_ddk.training.run_folder import check_save_folder, resolve_load


@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoints a run reads, each resolved once (None: the run reads none)."""

    teacher: Optional[ResolvedCheckpoint] = None
    """distill.teacher_load."""

    resume: Optional[ResolvedCheckpoint] = None
    """checkpoint.load (after `auto`), for training."""


@dataclass(frozen=True)
class PreparedRun:
    """A checked config and its resolved checkpoints."""

    cfg: RunConfig
    checkpoints: RunCheckpoints


def prepare(config: Union[str, dict], overrides: Sequence[str] = (), *,
            load: Optional[str] = None, training: bool = False,
            world_size: Optional[int] = None, launched: bool = True,
            resolve_files: bool = True,
            create_folders: bool = True, where: str = "") -> PreparedRun:
    """The checked RunConfig of a run and its checkpoints (module docstring); ConfigError /
    ValueError otherwise."""
    overrides: List[str] = list(overrides) + ([f"checkpoint.load={load}"] if load else [])
    if isinstance(config, str):
        cfg = load_config(config, overrides)
    else:
        cfg = config_from_data(config, overrides, where)
    checkpoints = RunCheckpoints()
    if resolve_files:
        teacher = _teacher_checkpoint(cfg)
        cfg = resolve_load(resolve_teacher(cfg, teacher))
        checkpoints = RunCheckpoints(teacher, _resume_checkpoint(cfg) if training else None)
    static_checks(cfg, world_size or (launcher_env()[1] if launched else None))
    check_writable_folder(cfg.logging.run_dir, "logging.run_dir", create=create_folders)
    if training and cfg.checkpoint.save:
        check_writable_folder(cfg.checkpoint.save, "checkpoint.save", create=create_folders)
    if training and resolve_files:
        check_save_folder(cfg, checkpoints.resume)
    return PreparedRun(cfg, checkpoints)


def prepare_run(config: Union[str, dict], overrides: Sequence[str] = (), **kwargs) -> RunConfig:
    """prepare(...).cfg: the checked config alone (check-config, eval, cache-teacher, the
    pipeline's plan check)."""
    return prepare(config, overrides, **kwargs).cfg


def run_checkpoints(cfg: RunConfig, training: bool = True) -> RunCheckpoints:
    """The checkpoints of an already prepared cfg, resolved now (a Trainer built without
    prepare, as tests do)."""
    return RunCheckpoints(_teacher_checkpoint(cfg),
                          _resume_checkpoint(cfg) if training else None)


def _teacher_checkpoint(cfg: RunConfig) -> Optional[ResolvedCheckpoint]:
    """distill.teacher_load resolved (train loads it before step 1), or None without a
    teacher."""
    if cfg.distill.teacher is None or not cfg.distill.teacher_load:
        return None
    try:
        return describe_checkpoint(cfg.distill.teacher_load)
    except CheckpointError as exc:
        raise ConfigError(f"distill.teacher_load: {exc}") from None


def _resume_checkpoint(cfg: RunConfig) -> Optional[ResolvedCheckpoint]:
    """checkpoint.load resolved (`auto` already replaced), or None for a fresh start."""
    if not cfg.checkpoint.load:
        return None
    try:
        return describe_checkpoint(cfg.checkpoint.load)
    except CheckpointError as exc:
        raise ConfigError(f"checkpoint.load: {exc}") from None
