"""The one place that chooses a transformer layer implementation.

`model.transformer_impl` picks Megatron-Core's local spec or its Transformer Engine spec; the
fusions that only TE (or apex) can run are switched on or off here as well, so call sites never
ask which implementation they got. FP8 is not decided here: it is a TransformerConfig field
(models/build.py) that only the TE spec's modules act on (models/fp8.py).

Must not import: megatron_ddk.training, .data, .losses, .ddk.
"""

from __future__ import annotations

from typing import Dict

from megatron_ddk.config import optional
from megatron_ddk.config.schema import ModelConfig

TE_MISSING = ("model.transformer_impl='transformer_engine' but Transformer Engine is not "
              "importable on this host (import transformer_engine.pytorch failed); install the "
              "'te' extra on a CUDA host, or set transformer_impl: local (no FP8, no sequence "
              "parallelism)")


def layer_spec(model: ModelConfig):
    """Megatron-Core ModuleSpec of one GPT layer for `model.transformer_impl`.

    local: Megatron-Core's own modules (ColumnParallelLinear / RowParallelLinear,
    DotProductAttention, torch norms); runs on CPU and GPU. transformer_engine: TE's modules
    (norm fused into the QKV and fc1 linears, TE attention); needed for FP8 and sequence
    parallelism. Both write the same checkpoint keys (Megatron-Core maps the local norms onto
    the TE names), so a checkpoint saved with one loads into the other.

    Raises:
        ValueError: transformer_engine asked for on a host where it does not import.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if model.transformer_impl == "transformer_engine":
        if not optional.have_transformer_engine():
            raise ValueError(TE_MISSING)
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    if model.transformer_impl != "local":
        raise ValueError(f"model.transformer_impl={model.transformer_impl!r}: use 'local' or "
                         f"'transformer_engine'")
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)


def fusion_flags(model: ModelConfig) -> Dict[str, bool]:
    """TransformerConfig fusion switches valid for the chosen implementation.

    All off for the local spec: its fused kernels need apex or TE (RoPE fusion, persistent
    layer norm, masked softmax), and the fused bias-activation / bias-dropout paths are
    torch-jit code that gains nothing on CPU. With TE: bias+SwiGLU (or bias+GeLU when the
    linears have biases; Megatron-Core refuses GeLU fusion without bias), bias+dropout+add,
    TE's fused RoPE (rotary models only). gradient_accumulation_fusion stays off: it writes
    weight gradients into DDP's main_grad buffers, which the frozen teacher never has.
    """
    te = model.transformer_impl == "transformer_engine"
    return {
        "bias_activation_fusion": te and (model.activation == "swiglu" or model.add_bias_linear),
        "masked_softmax_fusion": te,
        "persist_layer_norm": te,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": te and model.position_embedding_type == "rope",
        "bias_dropout_fusion": te,
    }
