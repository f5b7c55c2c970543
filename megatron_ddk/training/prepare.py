"""One preparation of a run config, the same for every command that runs or checks one.

    prepare_run(config, overrides, training=True)   # train; check-config (the same checks)
    prepare_run(config, overrides)                  # eval, cache-teacher
    prepare_run(data, overrides, world_size=N, resolve_files=False, create_folders=False)
                                                    # the pipeline's plan check, before any stage

The steps: load the YAML (or take plain data) with its overrides, resolve the teacher from its
checkpoint (which must exist) and `checkpoint.load: auto` (resolve_files), run the static checks
for the launcher's world size (or `world_size`; launched=False without one: no world-size rules,
as check-config off the cluster), check the output folders (create_folders: create them and write
a probe file; otherwise change nothing and require the nearest existing folder to be writable),
and, for training, the save-folder guard. Host checks (GPU, Transformer Engine, optional
packages) are the caller's next step: they import torch.

Imports no torch and no Megatron-Core: a typo in a config is reported in well under a second.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

from megatron_ddk.atomic import check_writable_folder
from megatron_ddk.config import ConfigError, RunConfig, config_from_data, load_config, static_checks
from megatron_ddk.models.checkpoint_layout import CheckpointError, resolve_checkpoint
from megatron_ddk.models.teacher_config import resolve_teacher
from megatron_ddk.parallel.launcher import launcher_env
from megatron_ddk.training.run_folder import check_save_folder, resolve_load


def prepare_run(config: Union[str, dict], overrides: Sequence[str] = (), *,
                load: Optional[str] = None, training: bool = False,
                world_size: Optional[int] = None, launched: bool = True,
                resolve_files: bool = True,
                create_folders: bool = True, where: str = "") -> RunConfig:
    """The checked RunConfig of a run (module docstring); ConfigError / ValueError otherwise."""
    overrides: List[str] = list(overrides) + ([f"checkpoint.load={load}"] if load else [])
    if isinstance(config, str):
        cfg = load_config(config, overrides)
    else:
        cfg = config_from_data(config, overrides, where)
    if resolve_files:
        _check_teacher_checkpoint(cfg)
        cfg = resolve_load(resolve_teacher(cfg))
    static_checks(cfg, world_size or (launcher_env()[1] if launched else None))
    check_writable_folder(cfg.logging.run_dir, "logging.run_dir", create=create_folders)
    if training and cfg.checkpoint.save:
        check_writable_folder(cfg.checkpoint.save, "checkpoint.save", create=create_folders)
    if training and resolve_files:
        check_save_folder(cfg)
    return cfg


def _check_teacher_checkpoint(cfg: RunConfig) -> None:
    """distill.teacher_load names a readable checkpoint (train loads it before step 1)."""
    if cfg.distill.teacher is None or not cfg.distill.teacher_load:
        return
    try:
        resolve_checkpoint(cfg.distill.teacher_load)
    except CheckpointError as exc:
        raise ConfigError(f"distill.teacher_load: {exc}") from None
