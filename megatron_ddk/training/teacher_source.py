"""The run's teacher, built once (training/builder.build_models): none (CPT), the online teacher
model, or an offline store (distill.teacher_logits). The trainer asks it, never the config:

    source.model                 the frozen teacher module of the pair (None: no teacher forward)
    source.describe()            for the start-up log line
    source.flops_model           the teacher whose forward the FLOPs count (None: none is run)
    source.evaluates_online      DDK's validation pass runs the teacher
    source.valid_losses(measured)  the teacher's per-domain validation losses
    source.training_ce           the loss can report the teacher's CE of every training token
                                 (ddk.signal: training)
    source.check_covered(batch)  before a step: every rank stops at the same step naming a
                                 (domain, sample) the store does not hold
    source.targets(batch, ...)   the stored teacher of one micro-batch (None: the pair's forward
                                 gives the teacher's logits)
    source.samples_served        for the end record (None without a store)

What a kind cannot serve (reverse KL or the training-batch signal from a store; DDK without a
teacher) is refused by the static checks (config/validate.py) before any of this is built.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from megatron_ddk.config import ModelConfig, RunConfig, to_dict
from megatron_ddk.data.teacher_store import TeacherStore, checkpoint_fingerprint
from megatron_ddk.models.checkpoint_layout import ResolvedCheckpoint, describe_checkpoint

logger = logging.getLogger(__name__)


class TeacherSource:
    """No teacher (CPT): CE only, nothing to evaluate, nothing to read."""

    kind = "none"
    model: Optional[torch.nn.Module] = None
    flops_model: Optional[ModelConfig] = None
    evaluates_online = False
    training_ce = False
    samples_served: Optional[int] = None

    def describe(self) -> str:
        return "no teacher (CPT)"

    def valid_losses(self, measured: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The teacher's per-domain validation losses given the pass's own (`measured`)."""
        return measured

    def check_covered(self, global_batch: Sequence) -> None:
        """Nothing to check without a store."""

    def targets(self, batch: Dict[str, torch.Tensor], device, timer) -> Optional[tuple]:
        """The stored teacher of one micro-batch; None: not from a store."""
        return None


class OnlineTeacher(TeacherSource):
    """The frozen teacher model, run beside the student (models/pair.py)."""

    kind = "online"
    evaluates_online = True
    training_ce = True

    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig):
        self.model, self.flops_model = model, model_cfg

    def describe(self) -> str:
        return "teacher"


class StoredTeacher(TeacherSource):
    """An offline store: the teacher's top-K per (domain, sample), read per micro-batch."""

    kind = "offline"

    def __init__(self, store: TeacherStore):
        self.store = store

    def describe(self) -> str:
        return f"teacher store {self.store.root}"

    @property
    def samples_served(self) -> int:  # type: ignore[override]
        return self.store.samples_served

    def valid_losses(self, measured: Optional[np.ndarray]) -> np.ndarray:
        """Measured by the store's producer (training/teacher_cache.py), as the trainer would."""
        return self.store.valid_losses()

    def check_covered(self, global_batch: Sequence) -> None:
        self.store.check_covered(global_batch)

    def targets(self, batch: Dict[str, torch.Tensor], device, timer) -> tuple:
        """(ids, log-probs, rest) of the micro-batch on `device`, timed as teacher_cache_read."""
        timer.start("teacher_cache_read")
        out = tuple(t.to(device) for t in self.store.read(
            batch["domain_id"], batch["sample_id"], tokens=batch["tokens"]))
        timer.stop("teacher_cache_read")
        return out


def run_identity(cfg: RunConfig, data: Any,
                 teacher_ckpt: Optional[ResolvedCheckpoint] = None) -> dict:
    """What a store must have been computed from to serve this run (teacher_store.IDENTITY_FIELDS).

    The teacher's checkpoint fingerprint and shape are included when the run names them
    (distill.teacher_load, resolved once as `teacher_ckpt` / distill.teacher); None fields are
    not compared."""
    teacher = cfg.distill.teacher
    fingerprint = None
    if cfg.distill.teacher_load:
        ckpt = teacher_ckpt or describe_checkpoint(cfg.distill.teacher_load)
        fingerprint = checkpoint_fingerprint(ckpt.folder)
    return {
        "teacher_fingerprint": fingerprint,
        "teacher_model": to_dict(teacher) if teacher is not None and not isinstance(teacher, str)
        else None,
        "tokenizer_hash": data.tokenizer_hash, "seq_length": int(cfg.data.seq_length),
        "temperature": float(cfg.distill.temperature), "seed": int(cfg.train.seed),
        "vocab_size": int(data.vocab_size), "domains": data.manifest.names(),
        "num_train_samples": [int(n) for n in data.datasets.num_train_samples],
        "valid_samples_per_domain": int(cfg.ddk.valid_samples_per_domain),
    }


def open_store(cfg: RunConfig, data: Any, teacher_ckpt: Optional[ResolvedCheckpoint]
               ) -> TeacherStore:
    """The store named by distill.teacher_logits, its identity checked against this run."""
    store = TeacherStore(cfg.distill.teacher_logits, data.manifest.names())
    store.check_identity(run_identity(cfg, data, teacher_ckpt))
    if cfg.distill.teacher_load is None:
        logger.warning("distill.teacher_load is not set: the store's teacher (%s) is not checked "
                       "against a checkpoint", store.identity.get("teacher_fingerprint"))
    return store


def source_kind(cfg: RunConfig) -> str:
    """none | online | offline, from the config alone."""
    if cfg.distill.teacher_logits:
        return "offline"
    return "online" if isinstance(cfg.distill.teacher, ModelConfig) else "none"
