"""Build a Megatron-Core GPTModel (student or teacher) from a ModelConfig.

Both models receive the same ParallelContext and one common padded vocabulary size. The layer
spec comes from models/spec.py; nothing here knows about CPU or GPU beyond the context's device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.models.spec import fusion_flags, layer_spec
from megatron_ddk.parallel.state import ParallelContext


def transformer_config(model: ModelConfig, ctx: ParallelContext, *, bf16: bool = False,
                       sequence_parallel: bool = False):
    """Megatron-Core TransformerConfig for `model` on this parallel layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute = model.recompute_granularity
    kwargs = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        kv_channels=model.kv_channels, normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear, add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=ctx.tp_size, pipeline_model_parallel_size=ctx.pp_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=ctx.device.type == "cpu",
        params_dtype=dtype, bf16=bf16, pipeline_dtype=dtype,
        recompute_granularity=recompute,
        recompute_method=model.recompute_method if recompute == "full" else None,
        recompute_num_layers=model.recompute_num_layers if recompute == "full" else None,
        num_layers_in_first_pipeline_stage=model.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=model.num_layers_in_last_pipeline_stage,
        # losses are token sums; Megatron divides by the global token count once (exact means
        # across micro-batches and data-parallel ranks)
        calculate_per_token_loss=True,
        **fusion_flags(model),
    )
    if model.fp8 is not None:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe,
                      fp8_amax_history_len=model.fp8_amax_history_len,
                      fp8_amax_compute_algo=model.fp8_amax_compute_algo)
    return TransformerConfig(**kwargs)


def build_gpt_model(model: ModelConfig, ctx: ParallelContext, padded_vocab_size: int, *,
                    bf16: bool = False, sequence_parallel: bool = False,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None):
    """A GPTModel holding this pipeline stage's layers, on ctx.device, logits vocab-parallel.

    Args:
        model: architecture.
        ctx: parallel context (its process groups are passed to Megatron-Core explicitly).
        padded_vocab_size: the common padded embedding size (models/vocab.py).
        bf16: build parameters in bf16 (GPU); fp32 otherwise.
        sequence_parallel: Megatron sequence parallelism (TE spec only).
        pre_process / post_process: override whether this stage has the embedding / output layer.
    """
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(model, ctx, bf16=bf16, sequence_parallel=sequence_parallel)
    gpt = GPTModel(
        config=config, transformer_layer_spec=layer_spec(model),
        vocab_size=padded_vocab_size, max_sequence_length=model.max_position_embeddings,
        pre_process=ctx.is_first_stage if pre_process is None else pre_process,
        post_process=ctx.is_last_stage if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent, rotary_base=model.rotary_base,
        pg_collection=ctx.pg_collection,
    )
    return gpt.to(ctx.device)
