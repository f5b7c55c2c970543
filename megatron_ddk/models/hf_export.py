"""The weights half of a Hugging Face export: checkpoint -> config.json + safetensors.

- export_model_config(folder, meta): the ModelConfig of a checkpoint (its megatron_ddk.json,
  else the run_config.yaml beside it), as a world-1 local-spec build sees it.
- export_vocab(...): how many embedding rows reach HF (padded rows must not: HF's softmax would
  give them probability).
- write_weights(...): build the model in this world-1 process, load the checkpoint
  (dist_checkpointing reshards any TP/PP), map the names (models/hf.py), cast, write safetensors
  (sharded with an index above max_shard_gb).
- write_hf_config(...): config.json and generation_config.json.
The tokenizer files are data/hf_tokenizer.py's; evaluation/export.py puts the two together.
Imports torch, safetensors and megatron_ddk.config / models / parallel only.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.models import hf

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
"""Weight dtypes an export can be written in."""


def export_model_config(folder: str, meta: Mapping) -> ModelConfig:
    """The checkpoint's ModelConfig from its metadata, else from the run_config.yaml beside it."""
    from megatron_ddk.config.loader import from_dict, load_config

    if meta.get("model"):
        model = from_dict(ModelConfig, meta["model"], "model")
    else:
        run_cfg = os.path.join(folder, "run_config.yaml")
        if not os.path.isfile(run_cfg):
            raise ValueError(f"{folder} records no model config (no megatron_ddk.json 'model' "
                             f"entry and no run_config.yaml); it was not written by megatron-ddk")
        model = load_config(run_cfg).model
    return hf.export_model_config(model)


def export_vocab(requested: Optional[int], model: ModelConfig, meta: Mapping,
                 tokenizer_rows: Optional[int], padded: int) -> int:
    """Rows kept: requested, else the vocab_size a training run recorded, else model.vocab_size,
    else the converted HF model's rows, else the tokenizer's size; refused when the tokenizer
    uses ids beyond the rows kept."""
    vocab = (requested or meta.get("vocab_size") or model.vocab_size
             or meta.get("hf_vocab_size") or tokenizer_rows)
    if vocab is None:
        logger.warning("no vocabulary size known: exporting all %d padded rows; pass "
                       "--vocab-size so padded tokens get no probability in HF", padded)
        vocab = padded
    if vocab > padded:
        raise ValueError(f"--vocab-size={vocab} exceeds the checkpoint's {padded} embedding rows")
    if tokenizer_rows is not None and tokenizer_rows > vocab:
        raise ValueError(f"the tokenizer has ids up to {tokenizer_rows - 1} but only {vocab} "
                         f"embedding rows would be exported; pass --vocab-size {tokenizer_rows}")
    return int(vocab)


def export_dtype(requested: str, meta: Mapping) -> str:
    """requested, or for 'auto' the converted HF model's dtype when recorded, else bfloat16."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype {requested!r}: use auto or one of {list(DTYPES)}")
        return requested
    hf_cfg = meta.get("hf_config") or {}
    dtype = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype")
    return dtype if dtype in DTYPES else "bfloat16"


def write_safetensors(tensors: Dict[str, "torch.Tensor"], out: str,
                      max_shard_gb: float) -> List[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index above max_shard_gb."""
    from safetensors.torch import save_file

    limit = max(1, int(max_shard_gb * 1e9))
    shards: List[Dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": {n: fname for fname, s in zip(names, shards) for n in s}}
        write_json(os.path.join(out, "model.safetensors.index.json"), index)
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
    return names


def write_json(path: str, data: dict) -> None:
    """Pretty JSON with a trailing newline (HF's own files look the same)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_weights(folder: str, model: ModelConfig, padded: int, vocab: int, dtype: str,
                  out: str, max_shard_gb: float, ctx) -> List[str]:
    """Load the checkpoint folder into a world-1 model and write its HF safetensors into out."""
    import torch

    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model

    if ctx.world_size != 1:
        raise ValueError("run the exporter as one process (no torchrun)")
    gpt = build_gpt_model(model, ctx, padded)
    load_model(folder, gpt)
    state = {n: p.detach().cpu() for n, p in gpt.named_parameters()}
    tensors = {n: t.to(getattr(torch, dtype), copy=True)  # copies: q/k/v are views of one tensor
               for n, t in hf.megatron_to_hf(state, model, vocab).items()}
    return write_safetensors(tensors, out, max_shard_gb)


def write_hf_config(out: str, model: ModelConfig, vocab: int, dtype: str, meta: Mapping,
                    special: Mapping[str, int]) -> dict:
    """config.json (+ generation_config.json with the bos/eos/pad ids when any is known)."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    config = hf.hf_config_from_model(model, vocab, dtype, meta.get("hf_config"),
                                     {k: special.get(k) for k in keys})
    write_json(os.path.join(out, "config.json"), config)
    gen = dict(meta.get("hf_generation_config") or {})
    for key in keys:
        if config.get(key) is not None:
            gen.setdefault(key, config[key])
    if gen.get("eos_token_id") is None:
        logger.warning("no eos token id known: %s/generation_config.json is not written "
                       "(generation would not stop at end of text)", out)
    else:
        write_json(os.path.join(out, "generation_config.json"), gen)
    return config
