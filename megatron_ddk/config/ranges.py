"""Allowed ranges of the numeric config fields, as one table; every message names the field.

`range_errors(cfg)` checks every float field for a finite value (a YAML .nan or .inf slips
through plain comparisons) and every field of RANGES for its bounds. Fields whose rule involves
other fields as well (train.lr vs min_lr, batch divisibility, pipeline splits, ...) and a few
plain bounds that predate this table live in validate.py; tests/config/test_ranges.py walks the
schema and checks that every numeric field is refused out of range by one or the other.
Imports nothing from megatron_ddk but the config schema.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_ddk.config.schema import ModelConfig, RunConfig


@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval; None leaves that side unbounded."""

    lo: Optional[float] = None
    """Lower bound."""

    hi: Optional[float] = None
    """Upper bound."""

    lo_open: bool = False
    """Exclude lo itself."""

    hi_open: bool = False
    """Exclude hi itself."""

    def contains(self, value: float) -> bool:
        """Whether value is inside (written so that NaN is outside)."""
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return bool(above and below)

    def text(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)'."""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")


AT_LEAST_1 = Range(lo=1)
NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
PROBABILITY_BELOW_1 = Range(lo=0, hi=1, hi_open=True)
FRACTION = Range(lo=0, hi=1)

MODEL_RANGES: Dict[str, Range] = {
    "num_query_groups": AT_LEAST_1,
    "ffn_hidden_size": AT_LEAST_1,
    "kv_channels": AT_LEAST_1,
    "norm_epsilon": POSITIVE,
    "rotary_base": POSITIVE,
    "rotary_percent": Range(lo=0, hi=1, lo_open=True),
    "vocab_size": AT_LEAST_1,
    "make_vocab_size_divisible_by": AT_LEAST_1,
    "padded_vocab_size": AT_LEAST_1,
    "hidden_dropout": PROBABILITY_BELOW_1,
    "attention_dropout": PROBABILITY_BELOW_1,
    "init_method_std": POSITIVE,
    "recompute_num_layers": AT_LEAST_1,
    "num_layers_in_first_pipeline_stage": AT_LEAST_1,
    "num_layers_in_last_pipeline_stage": AT_LEAST_1,
    "fp8_amax_history_len": AT_LEAST_1,
}
"""ModelConfig fields (checked for model and distill.teacher). num_layers, hidden_size,
num_attention_heads and max_position_embeddings: validate._model_checks."""

RANGES: Dict[str, Dict[str, Range]] = {
    "parallel": {"distributed_timeout_minutes": AT_LEAST_1},
    "ddk": {"weight_floor": FRACTION, "weight_cap": Range(lo=0, hi=1, lo_open=True)},
    "train": {
        "train_tokens": AT_LEAST_1,
        "lr_warmup_init": NON_NEGATIVE,
        "lr_decay_iters": AT_LEAST_1,
        "weight_decay": NON_NEGATIVE,
        "adam_beta1": PROBABILITY_BELOW_1,
        "adam_beta2": PROBABILITY_BELOW_1,
        "adam_eps": POSITIVE,
        "seed": NON_NEGATIVE,
        "exit_duration_minutes": POSITIVE,
        "exit_interval": AT_LEAST_1,
    },
}
"""Section -> field -> allowed range, for the other sections. Fields not listed here are
checked in validate.py (with the fields they depend on)."""


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _section_errors(obj, where: str, table: Dict[str, Range]) -> List[str]:
    errs = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _numeric(value):
            continue  # None (unset), strings, nested sections
        name = f"{where}.{f.name}"
        if isinstance(value, float) and not math.isfinite(value):
            errs.append(f"{name}={value}: must be a finite number")
        elif f.name in table and not table[f.name].contains(value):
            errs.append(f"{name}={value}: must be {table[f.name].text()}")
    return errs


def range_errors(cfg: RunConfig) -> List[str]:
    """Every numeric field outside its range (or not finite), named section.field."""
    errs = _section_errors(cfg.model, "model", MODEL_RANGES)
    if isinstance(cfg.distill.teacher, ModelConfig):
        errs += _section_errors(cfg.distill.teacher, "distill.teacher", MODEL_RANGES)
    for section in ("parallel", "data", "distill", "ddk", "train", "checkpoint", "logging"):
        errs += _section_errors(getattr(cfg, section), section, RANGES.get(section, {}))
    return errs
