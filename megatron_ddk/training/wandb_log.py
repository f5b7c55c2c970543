"""Weights & Biases logging of a run: the scalars TensorBoard gets, on the logging rank only.

logging.wandb_project / wandb_exp_name / wandb_save_dir follow Megatron-LM's --wandb-project,
--wandb-exp-name and --wandb-save-dir. wandb is the optional 'wandb' extra, imported here only
(config.optional.require_extra names the extra when it is missing; host checks refuse such a
config before the run starts). WANDB_MODE=offline writes the run to disk for a later `wandb sync`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from megatron_ddk.config import RunConfig, to_dict
from megatron_ddk.config.optional import require_extra
from megatron_ddk.config.schema import LoggingConfig


class WandbWriter:
    """One wandb run; `log(step, values)` mirrors RunLogger.scalars.

    Args:
        cfg: the run's logging section (wandb_project set).
        config: the run config as a dict (shown as the wandb run's config).
        resume_step: the step a resumed run continues from (recorded in the run's config).
    """

    def __init__(self, cfg: LoggingConfig, config: Dict[str, Any], resume_step: int = 0):
        wandb = require_extra("wandb", "logging.wandb_project")
        save_dir = cfg.wandb_save_dir or os.path.join(cfg.run_dir, "wandb")
        os.makedirs(save_dir, exist_ok=True)
        name = cfg.wandb_exp_name or os.path.basename(os.path.abspath(cfg.run_dir))
        self.run = wandb.init(project=cfg.wandb_project, name=name, dir=save_dir,
                              config=dict(config, resume_step=resume_step), reinit=True)
        self.dir: Optional[str] = getattr(self.run, "dir", None)

    def log(self, step: int, values: Dict[str, float]) -> None:
        """Scalars of one step (None values skipped); steps never decrease within a run."""
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_factory(cfg: RunConfig, resume_step: int) -> Optional[Callable[[], WandbWriter]]:
    """What RunLogger calls on the logging rank to open the run's wandb writer; None when
    logging.wandb_project is unset."""
    if not cfg.logging.wandb_project:
        return None
    return lambda: WandbWriter(cfg.logging, to_dict(cfg), resume_step)
