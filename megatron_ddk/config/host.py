"""Host checks, run at launch: what the configured features need from this machine.

Static checks (validate.py) run everywhere; these refuse a config only on a host that cannot run
it, with a message saying what is missing. Imports nothing from megatron_ddk but the config package
and the one optional-dependency probe (megatron_ddk.config.optional).
"""

from __future__ import annotations

import logging
from typing import List

import torch

from megatron_ddk.config.loader import ConfigError
from megatron_ddk.config.optional import have_cuda, have_module, have_transformer_engine
from megatron_ddk.config.schema import ModelConfig, RunConfig

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; V100 / T4 have none


def _model_host_errors(m: ModelConfig, where: str) -> List[str]:
    errs = []
    if m.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            errs.append(f"{where}.transformer_impl='transformer_engine' but Transformer Engine is "
                        f"not importable on this host; install the 'te' extra on a GPU host or use "
                        f"'local'")
        if not have_cuda():
            errs.append(f"{where}.transformer_impl='transformer_engine' needs a CUDA GPU; this "
                        f"host has none")
    if m.fp8 is not None:
        if not have_cuda():
            errs.append(f"{where}.fp8={m.fp8!r} needs an FP8-capable GPU (Hopper/Ada); this host "
                        f"has no CUDA GPU")
        elif torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
            cap = torch.cuda.get_device_capability()
            errs.append(f"{where}.fp8={m.fp8!r} needs compute capability >= 8.9 (Hopper/Ada); this "
                        f"GPU has {cap[0]}.{cap[1]}")
    return errs


def host_errors(cfg: RunConfig) -> List[str]:
    """What this host lacks for `cfg` (empty when it can run it)."""
    errs = _model_host_errors(cfg.model, "model")
    if cfg.distill.teacher is not None:
        errs += _model_host_errors(cfg.distill.teacher, "distill.teacher")
    if cfg.logging.wandb_project and not have_module("wandb"):
        errs.append(f"logging.wandb_project={cfg.logging.wandb_project!r} but the wandb package "
                    "is not installed: pip install 'megatron-ddk[wandb]', or unset it")
    backend = cfg.parallel.distributed_backend
    if backend == "nccl" and not (have_cuda() and torch.distributed.is_nccl_available()):
        errs.append("parallel.distributed_backend='nccl' but NCCL/CUDA is not available on this "
                    "host; use 'auto' or 'gloo'")
    cap = torch.cuda.get_device_capability() if cfg.train.bf16 and have_cuda() else None
    if cap is not None and tuple(cap) < BF16_MIN_CAPABILITY:
        errs.append(f"train.bf16=true but this GPU (compute capability {cap[0]}.{cap[1]}) has no "
                    f"bf16 support (needs >= 8.0, Ampere or newer); set train.bf16=false")
    return errs


def host_warnings(cfg: RunConfig) -> List[str]:
    """What this host can run but not the way production does (empty when nothing to say)."""
    warns = []
    if cfg.train.bf16 and not have_cuda():
        warns.append("train.bf16=true on a CPU host: bf16 mixed precision runs for real here "
                     "(Float16Module, fp32 main parameters) but is for testing only and slower "
                     "than fp32 on CPUs; leave train.bf16 null for fp32 on CPU, bf16 on GPU")
    return warns


def host_checks(cfg: RunConfig) -> RunConfig:
    """Raise ConfigError listing what this host lacks; log host_warnings; return cfg."""
    errs = host_errors(cfg)
    if errs:
        raise ConfigError("this host cannot run the configuration:\n  - " + "\n  - ".join(errs))
    for warning in host_warnings(cfg):
        logger.warning(warning)
    return cfg
