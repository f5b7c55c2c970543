"""FP8 (Transformer Engine) for one model's forward: Megatron-Core's own context, and a log line.

Each model (student, teacher) carries its own ModelConfig.fp8 / fp8_recipe / amax settings, which
models/build.py copies into that model's TransformerConfig. FP8 is therefore a per-model switch:
an FP8 teacher with a bf16 student, both in FP8, or neither.

Who enters the FP8 region. Megatron-Core 0.16.1's TransformerBlock.forward already enters
`megatron.core.fp8_utils.get_fp8_context(self.config)` around its layers whenever its config has
fp8 set (one outer region for the delayed-scaling recipe, one region per layer for the others),
so a model built with fp8 runs its transformer layers in FP8 without anything at the call site.
`fp8_context()` below returns that same context for callers that want the region explicit
(a wrapper around `self.teacher(...)`, a benchmark timing TE modules directly); nesting it around
the model call is harmless: Transformer Engine counts nested fp8_autocast regions and reduces the
delayed-scaling amaxes once, at the outermost exit. (An outer region would only defeat
Megatron-Core's per-layer bf16 exceptions, first_last_layers_bf16, which this project does not
expose.)

What runs in FP8: the GEMMs of Transformer Engine's linear layers (QKV, attention output
projection, MLP fc1/fc2; the fused norm+linear modules too). What does not: the embedding, the
output (logits) layer (Megatron-Core's own ColumnParallelLinear, bf16), softmax attention unless
fp8_dot_product_attention is set (it is not), norms' statistics, and the losses: the
distillation loss (losses/kl.py) computes CE and KL in fp32 chunks from bf16/fp32 logits.

The FP8 copies of a frozen teacher's weights. Megatron-Core's TE linears cast their weights to
FP8 on the first micro-batch of a step and reuse that cast until `set_is_first_microbatch()`
marks the next step; the schedules call it on the model they drive, and only when that model's
config has fp8 (the student's). Beside a bf16 student, an FP8 teacher would keep its very first
cast for the whole run: with the delayed-scaling recipe that cast is made with the initial scale
of 1, before any amax was seen. `recast_fp8_weights_every_forward(teacher)` turns the cache off
for the teacher (each forward casts with the current scales; the cost is one read of the
teacher's bf16 weights per micro-batch).

On a host without Transformer Engine fp8_context() degrades to contextlib.nullcontext(), like
Megatron-Core's own get_fp8_context, so call sites stay unconditional; a config asking for FP8 on
such a host is refused earlier by the host checks (config/host.py), never silently run in bf16.

Must not import: megatron_ddk.training, .data, .losses, .ddk.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager, Optional

from megatron_ddk.config import optional
from megatron_ddk.config.schema import ModelConfig

logger = logging.getLogger(__name__)

_RECIPE_NAMES = {
    "delayed": "delayed scaling",
    "tensorwise": "per-tensor current scaling",
    "mxfp8": "MXFP8 block scaling",
    "blockwise": "block-wise scaling",
}
_FORMAT_NAMES = {"e4m3": "E4M3", "hybrid": "hybrid (E4M3 forward, E5M2 gradients)"}


def fp8_context(model_cfg: Optional[ModelConfig], transformer_config: Any) -> ContextManager:
    """The FP8 region for one forward of the model built from `model_cfg`.

    Args:
        model_cfg: the model's ModelConfig (student or distill.teacher); its `fp8` decides.
            None: decide from transformer_config alone (for code that holds only the built
            module, e.g. `fp8_context(None, self.teacher.config)`).
        transformer_config: the TransformerConfig that model was built with
            (`model.config`); Megatron-Core reads the format, recipe and amax settings from it.

    Returns:
        Megatron-Core's `fp8_utils.get_fp8_context(transformer_config)` (a Transformer Engine
        fp8_autocast with the recipe of that config) when the model has an FP8 format and
        Transformer Engine imports; contextlib.nullcontext() otherwise.

    Raises:
        ValueError: model_cfg and transformer_config disagree on the format, i.e. the model was
            not built from this ModelConfig.
    """
    built = getattr(transformer_config, "fp8", None)
    if model_cfg is not None and built != model_cfg.fp8:
        raise ValueError(f"fp8_context: the ModelConfig has fp8={model_cfg.fp8!r} but the "
                         f"model's TransformerConfig has fp8={built!r}; pass the config the model "
                         f"was built with (models/build.py copies the fp8 fields into it)")
    if built is None or not optional.have_transformer_engine():
        return contextlib.nullcontext()
    from megatron.core import fp8_utils

    return fp8_utils.get_fp8_context(transformer_config)


def recast_fp8_weights_every_forward(model) -> int:
    """Make the TE layers of an FP8 model cast their weights with the current scales on every
    forward instead of reusing a cast from an earlier micro-batch (see the module docstring).

    For the frozen teacher, whose weight cache no schedule ever refreshes. A no-op (returns 0)
    when the model's config has no fp8 or the model has no TE layers.

    Returns:
        The number of layers changed.
    """
    if getattr(getattr(model, "config", None), "fp8", None) is None:
        return 0
    changed = 0
    for module in model.modules():
        # Megatron-Core's TE wrappers read this flag on every forward: True passes
        # is_first_microbatch=None to TE, which then casts without caching
        if hasattr(module, "is_first_microbatch") and hasattr(
                module, "disable_parameter_transpose_cache"):
            module.disable_parameter_transpose_cache = True
            changed += 1
    return changed


def describe_fp8(model_cfg: ModelConfig) -> str:
    """One line for logs: the model's forward precision and, with FP8, format and recipe."""
    if model_cfg.fp8 is None:
        te = model_cfg.transformer_impl == "transformer_engine"
        impl = "Transformer Engine" if te else "local"
        return f"no FP8 (bf16 on GPU, fp32 on CPU; {impl} layers)"
    text = (f"FP8 {_FORMAT_NAMES.get(model_cfg.fp8, model_cfg.fp8)}, "
            f"{_RECIPE_NAMES.get(model_cfg.fp8_recipe, model_cfg.fp8_recipe)}")
    if model_cfg.fp8_recipe == "delayed":
        text += (f", amax history {model_cfg.fp8_amax_history_len} "
                 f"({model_cfg.fp8_amax_compute_algo})")
    return text + "; Transformer Engine GEMMs in FP8, logits layer bf16, loss fp32"
