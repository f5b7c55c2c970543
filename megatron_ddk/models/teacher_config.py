"""The teacher's architecture, taken from its checkpoint: `distill.teacher: from_checkpoint`.

One function, `resolve_teacher`, runs once per command (train, eval, check-config) right after
the config is loaded and before the static checks that need the teacher's shape (pipeline split
rules, vocabulary padding, memory plans):

    distill.teacher             distill.teacher_load      result
    from_checkpoint (default*)  megatron-ddk checkpoint   the model recorded in megatron_ddk.json
    from_checkpoint             Megatron-LM checkpoint    error: give distill.teacher
    a mapping                   megatron-ddk checkpoint   the mapping; error listing every field
                                                          that disagrees with the recorded model
    a mapping                   Megatron-LM checkpoint    the mapping (nothing to compare)
    null / not given            not given                 no teacher (CPT)

    * loader.py makes from_checkpoint the default when teacher_load is set and teacher is not
      given; an explicit `teacher: null` means no teacher.

From the recorded model this run takes what the weights compute (FUNCTION_FIELDS, plus the
position table size and vocabulary padding); how this run executes it (RUN_FIELDS: layer
implementation, recompute, pipeline split, FP8, dropout) is not the checkpoint's business: the
layer implementation follows the student's `model.transformer_impl`, the rest keep their
defaults (give the teacher as a mapping to change them, e.g. an uneven pipeline split).
Imports the config package and checkpoint_layout only (no torch).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

from megatron_ddk.config.loader import ConfigError, from_dict, to_dict
from megatron_ddk.config.schema import ModelConfig, RunConfig
from megatron_ddk.models.checkpoint_layout import (
    META_FILE,
    SHAPE_FIELDS,
    CheckpointError,
    ResolvedCheckpoint,
    describe_checkpoint,
    model_differences,
)

FUNCTION_FIELDS = SHAPE_FIELDS + ("norm_epsilon", "rotary_base", "rotary_percent")
"""Fields that decide what a loaded model computes: an explicit teacher must agree on them."""

RUN_FIELDS = ("transformer_impl", "recompute_granularity", "recompute_method",
              "recompute_num_layers", "num_layers_in_first_pipeline_stage",
              "num_layers_in_last_pipeline_stage", "fp8", "fp8_recipe", "fp8_amax_history_len",
              "fp8_amax_compute_algo", "hidden_dropout", "attention_dropout", "init_method_std")
"""Fields about how this run executes the teacher; never taken from its checkpoint."""


def compared_fields(model: Dict[str, Any]) -> Tuple[str, ...]:
    """FUNCTION_FIELDS, plus max_position_embeddings when it sizes a learned position table."""
    if model.get("position_embedding_type") == "learned_absolute":
        return FUNCTION_FIELDS + ("max_position_embeddings",)
    return FUNCTION_FIELDS


def model_from_metadata(saved: Dict[str, Any], student: ModelConfig, where: str) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint, with this run's execution settings."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    data = {k: v for k, v in saved.items() if k in known and k not in RUN_FIELDS}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ConfigError(f"distill.teacher: from_checkpoint: {where} records model fields this "
                          f"version does not know ({', '.join(unknown)}); give distill.teacher "
                          f"as a mapping")
    data["transformer_impl"] = student.transformer_impl
    try:
        return from_dict(ModelConfig, data, "distill.teacher")
    except ConfigError as exc:
        raise ConfigError(f"distill.teacher: from_checkpoint: {where}: {exc}") from None


def teacher_problems(cfg: RunConfig, ckpt: Optional[ResolvedCheckpoint] = None
                     ) -> Tuple[Optional[ModelConfig], List[str]]:
    """(the teacher's ModelConfig or None, the errors that prevent resolving it); `ckpt` is
    distill.teacher_load already resolved (None: resolve it here)."""
    d = cfg.distill
    if d.teacher is None:
        return None, []
    explicit = d.teacher if isinstance(d.teacher, ModelConfig) else None
    if not d.teacher_load:
        if explicit is None:
            return None, ["distill.teacher: from_checkpoint needs distill.teacher_load (the "
                          "teacher's checkpoint folder)"]
        return explicit, []  # static checks report the missing teacher_load
    try:
        ckpt = ckpt or describe_checkpoint(d.teacher_load)
    except CheckpointError as exc:
        if explicit is not None:  # nothing to compare (e.g. a preset's placeholder path): the
            return explicit, []   # load reports it, check-config --deep too
        return None, [f"distill.teacher is from_checkpoint but distill.teacher_load cannot be "
                      f"read: {exc}"]
    folder, saved = ckpt.folder, ckpt.metadata.get("model")
    where = os.path.join(folder, META_FILE)
    if explicit is None:
        if not saved:
            return None, [f"distill.teacher is from_checkpoint (the default when "
                          f"distill.teacher_load is set) but {folder} records no model (no "
                          f"{META_FILE}: a Megatron-LM checkpoint?); give the teacher's "
                          f"architecture as a distill.teacher mapping"]
        try:
            return model_from_metadata(saved, cfg.model, where), []
        except ConfigError as exc:
            return None, [str(exc)]
    if saved:
        diffs = model_differences(saved, to_dict(explicit), compared_fields(saved))
        if diffs:
            return explicit, [f"distill.teacher disagrees with the teacher's checkpoint ({where}) "
                              f"on {len(diffs)} field(s): " + "; ".join(diffs) + ". Remove "
                              "distill.teacher to take the checkpoint's model, or fix these "
                              "fields"]
    return explicit, []


def resolve_teacher(cfg: RunConfig, ckpt: Optional[ResolvedCheckpoint] = None) -> RunConfig:
    """cfg with distill.teacher resolved to a ModelConfig (or None); ConfigError otherwise.
    `ckpt`: distill.teacher_load already resolved (training/prepare.py), not read again."""
    teacher, errs = teacher_problems(cfg, ckpt)
    if errs:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errs))
    if teacher is cfg.distill.teacher:
        return cfg
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=teacher))
