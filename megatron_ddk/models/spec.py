"""The one place that chooses a transformer layer implementation.

`model.transformer_impl` picks Megatron-Core's local spec or its Transformer Engine spec; the
fusions that only TE (or apex) can run are switched on or off here as well, so call sites never
ask which implementation they got.
"""

from __future__ import annotations

from typing import Dict

from megatron_ddk.config.optional import have_transformer_engine
from megatron_ddk.config.schema import ModelConfig


def layer_spec(model: ModelConfig):
    """Megatron-Core ModuleSpec of one GPT layer for `model.transformer_impl`."""
    from megatron.core.models.gpt import gpt_layer_specs

    if model.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise ValueError("model.transformer_impl='transformer_engine' but Transformer Engine "
                             "is not importable; install the 'te' extra or use 'local'")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)


def fusion_flags(model: ModelConfig) -> Dict[str, bool]:
    """TransformerConfig fusion switches valid for the chosen implementation."""
    te = model.transformer_impl == "transformer_engine"
    return {
        "bias_activation_fusion": te and model.activation == "swiglu",
        "masked_softmax_fusion": te,
        "persist_layer_norm": te,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": te,
        "bias_dropout_fusion": te,
    }
