"""Allowed values of single config fields, as one table; every message names the field.

`range_errors(cfg)` checks every float field for a finite value (a YAML .nan or .inf slips
through plain comparisons) and every field of MODEL_RANGES / RANGES against its rule: a Range
(closed, open or half-open bounds), a Choice (a fixed set of values, e.g. a setting this version
does not support yet) or Weights (a list of non-negative numbers with a positive sum). Each
message reads `section.field=value: must be <rule>[; <hint>]`. Rules that involve other fields
as well (train.min_lr vs lr, batch divisibility, pipeline splits, ...) live in validate.py;
tests/config/test_ranges.py walks the schema and checks that every numeric field is refused out
of range. Imports nothing from megatron_ddk but the config schema.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

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

    hint: str = ""
    """What the bounds mean or what to do, appended to the message after '; '."""

    def refuses(self, value: Any) -> bool:
        """A number outside the range (other types are the loader's type check's business)."""
        return _numeric(value) and not self.contains(value)

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


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values (None: the field must stay unset)."""

    values: Tuple[Any, ...]
    """The allowed values."""

    hint: str = ""
    """Why, or what to do, appended to the message after '; '."""

    def refuses(self, value: Any) -> bool:
        """A set value that is not one of `values`."""
        return value not in self.values

    def text(self) -> str:
        """'1', 'null', 'one of 1, 2'."""
        names = ["null" if v is None else repr(v) for v in self.values]
        return names[0] if len(names) == 1 else "one of " + ", ".join(names)


@dataclass(frozen=True)
class Weights:
    """A list of mixture weights: every one a finite number >= 0, and a positive sum."""

    hint: str = ""
    """Why, or what to do, appended to the message after '; '."""

    def refuses(self, value: Any) -> bool:
        """A list with a negative or non-finite entry, or whose entries sum to 0."""
        ok = all(_numeric(w) and math.isfinite(w) and w >= 0 for w in value)
        return not (ok and sum(value) > 0)

    def text(self) -> str:
        """The rule in words."""
        return "weights >= 0 with a positive sum"


Rule = Union[Range, Choice, Weights]
"""What a table maps a field to; each has refuses(value), text() and hint."""

AT_LEAST_1 = Range(lo=1)
NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
PROBABILITY_BELOW_1 = Range(lo=0, hi=1, hi_open=True)
FRACTION = Range(lo=0, hi=1)

MODEL_RANGES: Dict[str, Rule] = {
    "num_layers": AT_LEAST_1,
    "hidden_size": AT_LEAST_1,
    "num_attention_heads": AT_LEAST_1,
    "max_position_embeddings": AT_LEAST_1,
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
"""ModelConfig fields (checked for model and distill.teacher); the divisibility rules between
them (heads, query groups, TP, pipeline splits) are validate._model_checks'."""

RANGES: Dict[str, Dict[str, Rule]] = {
    "parallel": {
        "tensor_model_parallel_size": AT_LEAST_1,
        "pipeline_model_parallel_size": AT_LEAST_1,
        "virtual_pipeline_model_parallel_size": Choice(
            (None,), hint="interleaved (virtual) pipeline stages are not supported in this "
            "version"),
        "context_parallel_size": Choice(
            (1,), hint="context parallelism is not supported in this version"),
        "distributed_timeout_minutes": AT_LEAST_1,
    },
    "data": {"seq_length": Range(lo=2)},
    "distill": {"gamma": NON_NEGATIVE, "temperature": POSITIVE, "kl_chunk_tokens": AT_LEAST_1},
    "ddk": {
        "interval": AT_LEAST_1,
        "alpha": FRACTION,
        "valid_samples_per_domain": AT_LEAST_1,
        "static_weights": Weights(),
        "weight_floor": FRACTION,
        "weight_cap": Range(lo=0, hi=1, lo_open=True),
        "max_epochs_per_domain": POSITIVE,
    },
    "train": {
        "micro_batch_size": AT_LEAST_1,
        "global_batch_size": AT_LEAST_1,
        "train_iters": AT_LEAST_1,
        "train_tokens": AT_LEAST_1,
        "lr": POSITIVE,
        "min_lr": NON_NEGATIVE,
        "lr_warmup_init": NON_NEGATIVE,
        "lr_warmup_iters": NON_NEGATIVE,
        "lr_decay_iters": AT_LEAST_1,
        "weight_decay": NON_NEGATIVE,
        "adam_beta1": PROBABILITY_BELOW_1,
        "adam_beta2": PROBABILITY_BELOW_1,
        "adam_eps": POSITIVE,
        "clip_grad": Range(lo=0, hint="0 disables clipping"),
        "seed": NON_NEGATIVE,
        "exit_duration_minutes": POSITIVE,
        "exit_interval": AT_LEAST_1,
    },
    "checkpoint": {"save_interval": AT_LEAST_1, "keep_last": AT_LEAST_1},
    "logging": {"log_interval": AT_LEAST_1},
}
"""Section -> field -> its rule, for the other sections. A field's rules that depend on other
fields are validate.py's."""


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _message(name: str, value: Any, rule: Rule) -> str:
    """'section.field=value: must be <rule>[; <hint>]'."""
    return f"{name}={value}: must be {rule.text()}" + (f"; {rule.hint}" if rule.hint else "")


def _section_errors(obj, where: str, table: Dict[str, Rule]) -> List[str]:
    errs = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue  # unset (Optional fields); Choice((None,)) fields are unset by default
        name = f"{where}.{f.name}"
        rule = table.get(f.name)
        if isinstance(value, float) and not math.isfinite(value):
            errs.append(f"{name}={value}: must be a finite number")
        elif rule is not None and rule.refuses(value):
            errs.append(_message(name, value, rule))
    return errs


def range_errors(cfg: RunConfig) -> List[str]:
    """Every field that breaks its rule (or a float that is not finite), named section.field."""
    errs = _section_errors(cfg.model, "model", MODEL_RANGES)
    if isinstance(cfg.distill.teacher, ModelConfig):
        errs += _section_errors(cfg.distill.teacher, "distill.teacher", MODEL_RANGES)
    for section in ("parallel", "data", "distill", "ddk", "train", "checkpoint", "logging"):
        errs += _section_errors(getattr(cfg, section), section, RANGES.get(section, {}))
    return errs
