"""Hugging Face <-> Megatron-Core name and shape mapping (LLaMA, Qwen2 / Qwen-1.5, Mistral).

Pure functions over plain dicts and tensors: no file I/O, no torch.distributed, no transformers.
`megatron-ddk convert-hf` and `megatron-ddk export-hf` do the reading and writing.

Megatron side: the local-spec GPTModel state dict of the whole model at TP=1, PP=1 (what
build_gpt_model creates in a world-1 process); dist_checkpointing reshards it to any TP/PP at load
time, and the local spec's keys map onto the Transformer Engine spec's fused names there.

    HF                                          Megatron (local spec, TP=1)
    model.embed_tokens.weight      [V, h]       embedding.word_embeddings.weight  [V_pad, h]
    model.layers.i.input_layernorm.weight        decoder.layers.i.input_layernorm.weight
    self_attn.{q,k,v}_proj.{weight,bias}         decoder.layers.i.self_attention.linear_qkv.*
    self_attn.o_proj.weight                      decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm      decoder.layers.i.pre_mlp_layernorm.weight
    mlp.gate_proj / mlp.up_proj                  decoder.layers.i.mlp.linear_fc1.weight (gate; up)
    mlp.down_proj.weight                         decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                            decoder.final_layernorm.weight
    lm_head.weight (absent when tied)  [V, h]    output_layer.weight [V_pad, h] (absent when tied)

linear_qkv holds, for each query group g in order, [the g-th group's query heads, key head g,
value head g] (HF's repeat_kv pairs query head j with kv head j // (heads / groups), the same
grouping). RoPE needs no permutation: HF's rotate_half and Megatron's non-interleaved rotary both
rotate the two halves of each head. Embedding rows beyond the kept vocabulary are zero.
This module imports only torch and megatron_ddk.config.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from megatron_ddk.config.schema import ModelConfig

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
"""HF architectures the converter reads (Qwen-1.5 checkpoints are Qwen2ForCausalLM)."""

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                "MistralForCausalLM": "mistral"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some older checkpoints store; recomputed by both libraries."""

Shape = Tuple[int, ...]


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def hf_architecture(hf_config: Mapping, where: str = "config.json") -> str:
    """The HF architecture name, refused unless it is one of SUPPORTED_ARCHITECTURES."""
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else f"(model_type {hf_config.get('model_type')!r})"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _fail(where, f"architecture {arch} is not supported; supported architectures: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _rope_theta(cfg: Mapping, where: str) -> int:
    """rope_theta from either transformers v4 keys (rope_theta, rope_scaling) or v5's
    rope_parameters; scaled RoPE variants are refused (ModelConfig cannot express them)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise _fail(where, f"RoPE scaling {rope_type!r} is not supported (ModelConfig has no "
                           f"rope scaling fields); only plain RoPE models convert")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise _fail(where, f"rope_theta={theta} is not an integer; model.rotary_base is an int")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _fail(where, f"partial_rotary_factor={partial} is not supported")
    return int(theta)


def _max_positions(cfg: Mapping, arch: str, ignore_sliding_window: bool, where: str) -> int:
    """max_position_embeddings; a sliding window is refused, or (when ignored) caps the length
    so that every sequence the model is used with is shorter than the window (full attention
    and sliding-window attention then agree)."""
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    window = cfg.get("sliding_window")
    uses_window = window is not None and (arch == "MistralForCausalLM"
                                          or bool(cfg.get("use_sliding_window", False)))
    if uses_window and window < max_pos:
        if not ignore_sliding_window:
            raise _fail(where, f"sliding_window={window} (< max_position_embeddings={max_pos}) is "
                               f"not supported: Megatron's local spec attends to the full causal "
                               f"context. Pass --ignore-sliding-window to convert anyway with "
                               f"max_position_embeddings={window}, where both agree")
        logger.warning("%s: sliding window %d ignored; max_position_embeddings capped at %d",
                       where, window, window)
        max_pos = int(window)
    return max_pos


def model_config_from_hf(hf_config: Mapping, *, make_vocab_size_divisible_by: int = 128,
                         ignore_sliding_window: bool = False,
                         where: str = "config.json") -> ModelConfig:
    """ModelConfig of an HF LLaMA / Qwen2 / Mistral config.json. vocab_size is the HF embedding
    rows (the converter resets it), padded_vocab_size is left to the caller; num_query_groups and
    ffn_hidden_size are always explicit, kv_channels only when it differs from hidden / heads
    (as the shipped presets write them). Raises ValueError for what cannot be expressed."""
    arch = hf_architecture(hf_config, where)
    cfg = hf_config
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(where, f"hidden_act={act!r} is not supported; only silu (SwiGLU) MLPs convert")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise _fail(where, "attention_bias / mlp_bias are not supported (Megatron's "
                           "add_bias_linear puts a bias on every linear layer, LLaMA's flags "
                           "do not)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % groups:
        raise _fail(where, f"num_key_value_heads={groups} does not divide "
                           f"num_attention_heads={heads}")
    return ModelConfig(
        num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        kv_channels=head_dim if head_dim * heads != hidden else None,
        normalization="RMSNorm", norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        activation="swiglu", position_embedding_type="rope",
        rotary_base=_rope_theta(cfg, where), rotary_percent=1.0,
        max_position_embeddings=_max_positions(cfg, arch, ignore_sliding_window, where),
        add_bias_linear=False, add_qkv_bias=arch == "Qwen2ForCausalLM",
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        vocab_size=int(cfg["vocab_size"]),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
    )


def _dims(model: ModelConfig) -> Tuple[int, int, int, int, int]:
    """(hidden, heads, groups, head_dim, ffn)."""
    heads = model.num_attention_heads
    return (model.hidden_size, heads, model.num_query_groups or heads,
            model.kv_channels or model.hidden_size // heads,
            model.ffn_hidden_size or 4 * model.hidden_size)


def expected_hf_shapes(model: ModelConfig, hf_vocab_size: int) -> Dict[str, Shape]:
    """Every tensor an HF checkpoint of `model` holds, with its shape."""
    h, heads, groups, d, ffn = _dims(model)
    shapes: Dict[str, Shape] = {"model.embed_tokens.weight": (hf_vocab_size, h),
                                "model.norm.weight": (h,)}
    if not model.share_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (hf_vocab_size, h)
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (groups * d, h),
            p + "self_attn.v_proj.weight": (groups * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })
        if model.add_qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (heads * d,),
                           p + "self_attn.k_proj.bias": (groups * d,),
                           p + "self_attn.v_proj.bias": (groups * d,)})
    return shapes


def check_hf_shapes(actual: Mapping[str, Shape], model: ModelConfig, hf_vocab_size: int,
                    where: str) -> None:
    """Refuse a checkpoint whose tensors do not match what its config.json implies."""
    expected = expected_hf_shapes(model, hf_vocab_size)
    ignorable = {n for n in actual if n.endswith(_IGNORED_SUFFIXES)}
    if model.share_embeddings_and_output_weights:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected) - ignorable)
    wrong = [f"{n}: checkpoint {list(actual[n])} vs config {list(s)}"
             for n, s in expected.items() if n in actual and tuple(actual[n]) != tuple(s)]
    problems = []
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:5])
                        + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}"
                        + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}"
                        + (f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    if problems:
        raise _fail(where, "; ".join(problems) + ". The weights do not match config.json "
                           "(hidden_size, intermediate_size, heads, layers, vocab_size, "
                           "tie_word_embeddings); fix the config or use the matching weights")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int,
             head_dim: int) -> torch.Tensor:
    """HF q/k/v (weights [n*d, h] or biases [n*d]) -> Megatron's per-group [q..., k, v] rows."""
    rest = tuple(q.shape[1:])
    per_group = [q.reshape(groups, -1, *rest), k.reshape(groups, head_dim, *rest),
                 v.reshape(groups, head_dim, *rest)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int,
              head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv: Megatron linear_qkv rows -> contiguous HF q, k, v."""
    rest = tuple(qkv.shape[1:])
    q_rows = heads // groups * head_dim
    q, k, v = torch.split(qkv.reshape(groups, q_rows + 2 * head_dim, *rest),
                          [q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def pad_rows(weight: torch.Tensor, num_rows: int, padded_rows: int) -> torch.Tensor:
    """The first num_rows rows of `weight`, zero rows up to padded_rows."""
    if num_rows > weight.shape[0] or padded_rows < num_rows:
        raise ValueError(f"cannot keep {num_rows} of {weight.shape[0]} embedding rows padded "
                         f"to {padded_rows}")
    out = weight.new_zeros((padded_rows, *weight.shape[1:]))
    out[:num_rows] = weight[:num_rows]
    return out


def hf_to_megatron(get: Callable[[str], torch.Tensor], model: ModelConfig, vocab_size: int,
                   padded_vocab_size: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (Megatron TP=1 parameter name, tensor) one at a time, reading HF tensors on demand
    through `get(name)` (so a converter holds one HF tensor at a time, not the whole model).

    The embedding (and untied output layer) keep HF rows [0, vocab_size) and get zero rows up to
    padded_vocab_size.
    """
    _, heads, groups, d, _ = _dims(model)
    yield "embedding.word_embeddings.weight", pad_rows(get("model.embed_tokens.weight"),
                                                       vocab_size, padded_vocab_size)
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield mg + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        attn = hf + "self_attn."
        yield mg + "self_attention.linear_qkv.weight", fuse_qkv(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"),
            get(attn + "v_proj.weight"), groups, d)
        if model.add_qkv_bias:
            yield mg + "self_attention.linear_qkv.bias", fuse_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"),
                groups, d)
        yield mg + "self_attention.linear_proj.weight", get(attn + "o_proj.weight")
        yield mg + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        yield mg + "mlp.linear_fc1.weight", torch.cat(
            [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], dim=0)
        yield mg + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not model.share_embeddings_and_output_weights:
        yield "output_layer.weight", pad_rows(get("lm_head.weight"), vocab_size,
                                              padded_vocab_size)


def megatron_to_hf(state: Mapping[str, torch.Tensor], model: ModelConfig,
                   vocab_size: int) -> Dict[str, torch.Tensor]:
    """HF state dict (contiguous tensors, embedding rows truncated to vocab_size) from a
    Megatron TP=1 PP=1 local-spec state dict. Tied models get no lm_head.weight (as HF saves)."""
    _, heads, groups, d, _ = _dims(model)
    out: Dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        out[hf + "input_layernorm.weight"] = state[mg + "input_layernorm.weight"]
        q, k, v = split_qkv(state[mg + "self_attention.linear_qkv.weight"], heads, groups, d)
        out.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k,
                    attn + "v_proj.weight": v})
        if model.add_qkv_bias:
            q, k, v = split_qkv(state[mg + "self_attention.linear_qkv.bias"], heads, groups, d)
            out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k, attn + "v_proj.bias": v})
        out[attn + "o_proj.weight"] = state[mg + "self_attention.linear_proj.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[mg + "pre_mlp_layernorm.weight"]
        gate, up = torch.chunk(state[mg + "mlp.linear_fc1.weight"], 2, dim=0)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        out[hf + "mlp.down_proj.weight"] = state[mg + "mlp.linear_fc2.weight"]
    if not model.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    return {name: t.contiguous() for name, t in out.items()}


def export_architecture(model: ModelConfig) -> str:
    """LlamaForCausalLM, or Qwen2ForCausalLM for a QKV-bias model; ValueError for a model HF's
    LLaMA / Qwen2 classes cannot express."""
    problems = []
    if model.position_embedding_type != "rope":
        problems.append(f"position_embedding_type={model.position_embedding_type!r} (needs 'rope')")
    if model.rotary_percent != 1.0:
        problems.append(f"rotary_percent={model.rotary_percent} (needs 1.0)")
    if model.activation != "swiglu":
        problems.append(f"activation={model.activation!r} (needs 'swiglu')")
    if model.normalization != "RMSNorm":
        problems.append(f"normalization={model.normalization!r} (needs 'RMSNorm')")
    if model.add_bias_linear:
        problems.append("add_bias_linear=true (needs false; only a QKV bias is expressible)")
    if problems:
        raise ValueError("model cannot be exported as a Hugging Face LLaMA or Qwen2 model: "
                         + "; ".join(problems))
    return "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"


def hf_config_from_model(model: ModelConfig, vocab_size: int, dtype: str,
                         base: Optional[Mapping] = None,
                         special_ids: Optional[Mapping[str, Optional[int]]] = None) -> dict:
    """config.json for the exported model. Structural fields come from `model`; everything else
    (bos/eos ids, ...) from `base` (the original HF config recorded at conversion) when it is of
    the same model type, else from special_ids. Legacy keys (rope_theta, torch_dtype) are written
    so that transformers 4.x and 5.x both read it."""
    arch = export_architecture(model)
    model_type = _MODEL_TYPES[arch]
    h, heads, groups, d, ffn = _dims(model)
    cfg = dict(base) if base and base.get("model_type") == model_type else {}
    for key in ("transformers_version", "layer_types", "dtype"):
        cfg.pop(key, None)
    if not cfg and special_ids:
        cfg.update({k: v for k, v in special_ids.items() if v is not None})
    cfg.update({
        "architectures": [arch], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": h, "intermediate_size": ffn, "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": d,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon, "vocab_size": vocab_size,
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "initializer_range": model.init_method_std, "torch_dtype": dtype, "use_cache": True,
        "attention_dropout": 0.0,
    })
    cfg.update({"rope_theta": float(model.rotary_base), "rope_scaling": None})
    if "rope_parameters" in cfg:  # a transformers 5 base config: keep both spellings consistent
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if arch == "LlamaForCausalLM":
        cfg.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None,
                    "max_window_layers": model.num_layers})
    return cfg


def export_model_config(model: ModelConfig) -> ModelConfig:
    """The model as a world-1 (TP=1, PP=1) local-spec fp32 build sees it: pipeline-split,
    recompute and FP8 fields reset (they do not change the weights)."""
    return dataclasses.replace(model, num_layers_in_first_pipeline_stage=None,
                               num_layers_in_last_pipeline_stage=None, recompute_granularity=None,
                               fp8=None, transformer_impl="local", hidden_dropout=0.0,
                               attention_dropout=0.0)
