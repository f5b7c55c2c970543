"""`megatron-ddk eval`: per-domain validation loss and perplexity of one checkpoint.

The checkpoint may be a student or a teacher (any TP/PP it was saved at); it is loaded into the
`model` section's architecture and evaluated on the manifest's validation sets exactly as the
trainer evaluates (training/evaluate.py).
"""

from __future__ import annotations

import math

from megatron_ddk.config import RunConfig, to_dict
from megatron_ddk.models.build import build_gpt_model
from megatron_ddk.models.checkpoint import check_compatible, load_model, read_metadata, resolve_checkpoint
from megatron_ddk.models.pair import DistillationPair
from megatron_ddk.models.vocab import common_padded_vocab_size
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training import builder
from megatron_ddk.training.evaluate import evaluate_domains


def evaluate_checkpoint(cfg: RunConfig, ctx: ParallelContext, load: str) -> dict:
    """{"checkpoint", "iteration", "domains": {name: {"loss", "ppl", "tokens"}}}."""
    data = builder.build_data(cfg, ctx, cfg.ddk.valid_samples_per_domain)
    folder, iteration = resolve_checkpoint(load)
    meta = read_metadata(folder)
    padded = meta.get("padded_vocab_size") or common_padded_vocab_size(
        cfg.model, None, data.vocab_size, ctx.tp_size)
    check_compatible(meta, to_dict(cfg.model), padded, data.tokenizer_hash, load)
    bf16 = builder.use_bf16(cfg)
    model = build_gpt_model(cfg.model, ctx, padded, bf16=bf16)
    load_model(folder, model)
    if bf16:  # as Float16Module does in training: torch's norms are built fp32, cast them too
        model.bfloat16()
    losses, _, tokens = evaluate_domains(
        DistillationPair(model, None), ctx, data.datasets.valid,
        micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.data.seq_length,
        vocab_size=data.vocab_size, with_teacher=False, chunk_tokens=cfg.distill.kl_chunk_tokens)
    domains = {name: {"loss": float(l), "ppl": float(math.exp(l)), "tokens": int(t)}
               for name, l, t in zip(data.manifest.names(), losses, tokens)}
    return {"checkpoint": folder, "iteration": iteration, "domains": domains}
