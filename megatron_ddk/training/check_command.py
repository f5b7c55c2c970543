"""Entry function of `megatron-ddk check-config`: exactly what `megatron-ddk train` runs before
it builds anything (training/prepare.prepare_run: the config, the teacher and checkpoint.load
resolved, static checks, output folders, the save-folder guard; it creates no folder), then
optionally the deep checks (the manifest and the checkpoints it names) and this host's checks.

Straight-line like training/entry.py; user errors propagate as ValueError (ConfigError) and the
caller maps them to exit code 2 (console.run_command). Apart from entry.py so that checking a
config does not import the trainer (Megatron-Core's models, optimizer and schedules).

Must not import megatron_ddk.training.trainer or anything that builds a model.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from megatron_ddk.config import ConfigError, load_config
from megatron_ddk.console import USER_ERROR, messages
from megatron_ddk.training.deep_check import deep_errors
from megatron_ddk.training.prepare import prepare_run


def check_config_main(config: str, overrides: List[str], world_size: Optional[int] = None,
                      host: bool = False, deep: bool = False, static: bool = False) -> int:
    """Static checks of `config` (batch sizes for `world_size` when given); `deep` also reads the
    manifest and checkpoint metadata and reports every problem; `host` adds this host's checks
    (Transformer Engine, GPU capability), each failure on its own `host:` line (exit 2).
    `static` checks only what needs no files (the checkpoints and folders are not read)."""
    if deep:
        logging.getLogger("megatron").setLevel(logging.WARNING)  # .idx reader chatter
        errs = deep_errors(load_config(config, overrides), world_size)
        if errs:
            raise ConfigError(f"{len(errs)} problem(s):\n  - " + "\n  - ".join(errs))
    cfg = prepare_run(config, overrides, training=True, world_size=world_size, launched=False,
                      resolve_files=not static, create_folders=False)
    what = "static" if static else "train's"
    messages().info(f"{config}: {what} {'and deep ' if deep else ''}checks passed")
    if not host:
        return 0
    from megatron_ddk.config.host import host_errors  # imports torch

    errs = host_errors(cfg)
    for e in errs:
        messages().error(f"host: {e}")
    return USER_ERROR if errs else 0
