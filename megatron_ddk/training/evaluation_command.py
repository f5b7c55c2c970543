"""`megatron-ddk eval`: per-domain loss and perplexity of one checkpoint on a held-out split.

The checkpoint may be a student or a teacher (any TP/PP it was saved at). Its model is the one
its megatron_ddk.json records when that differs from the config's `model` section (one config
evaluates teacher and student; a log line says so), else the config's. The split is `test` by
default (reports; never read by training or DDK) or `valid` (DDK's steering set); the samples
are built by data/domain_datasets.build_heldout_samples in the same fixed order training uses
for validation, so every evaluation of the same manifest, split, sample count and seq_length
reads the same tokens. Default sample count: every test sample, or
ddk.valid_samples_per_domain for valid; `--samples N` overrides it.

The result records what makes evaluations comparable (make_report refuses to compare two that
differ): split, seq_length, per-domain sample and token counts, and fingerprints (sha256 of the
exact token windows per domain, and one over all domains). Per domain it also holds
`sample_losses` (each sample's mean token CE, sample order; null for a sample without a scored
token) and `sample_tokens`, so a report can pair two checkpoints' samples (docs/report.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Dict, Optional

from megatron_ddk.config import RunConfig, static_checks, to_dict
from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.data.domain_datasets import build_heldout_samples
from megatron_ddk.models.checkpoint_layout import (
    META_FILE,
    check_compatible,
    describe_checkpoint,
    model_differences,
)
from megatron_ddk.models.pair import DistillationPair
from megatron_ddk.models.teacher import load_checkpoint_model
from megatron_ddk.models.teacher_config import compared_fields, model_from_metadata
from megatron_ddk.models.vocab import common_padded_vocab_size
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training import builder
from megatron_ddk.training.evaluate import evaluate_domains

logger = logging.getLogger(__name__)

SPLITS = ("valid", "test")
"""What `megatron-ddk eval --split` accepts."""

RESULT_FORMAT = 3
"""Version of the result JSON (2: split, seq_length, samples and fingerprints recorded; 3: also
every sample's mean CE and scored tokens, in sample order, for the report's fidelity check)."""


def eval_model(cfg: RunConfig, meta: Dict[str, Any], folder: str) -> ModelConfig:
    """The model to build: the checkpoint's recorded one when the config's model section
    differs from it (one log line says so), else the config's."""
    saved = meta.get("model")
    if not saved:
        return cfg.model  # a Megatron-LM checkpoint records no model: the config's it is
    diffs = model_differences(saved, to_dict(cfg.model), compared_fields(saved))
    if not diffs:
        return cfg.model
    model = model_from_metadata(saved, cfg.model, os.path.join(folder, META_FILE))
    logger.info("eval: the checkpoint's model differs from the config's model section (%s); "
                "building the model %s records", "; ".join(diffs[:3])
                + (f"; +{len(diffs) - 3} more" if len(diffs) > 3 else ""), META_FILE)
    return model


def samples_fingerprint(split: str, seq_length: int, per_domain: Dict[str, str]) -> str:
    """'sha256:<hex>' over the split, seq_length and every domain's sample fingerprint."""
    text = json.dumps({"split": split, "seq_length": int(seq_length), "domains": per_domain},
                      sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def evaluate_checkpoint(cfg: RunConfig, ctx: ParallelContext, load: str, split: str = "test",
                        num_samples: Optional[int] = None) -> dict:
    """{"checkpoint", "iteration", "split", "seq_length", "fingerprint", "manifest", "model",
    "domains": {name: {"loss", "ppl", "tokens", "samples", "fingerprint", "sample_losses",
    "sample_tokens"}}}."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: expected one of {list(SPLITS)}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"--samples {num_samples}: must be >= 1")
    if num_samples is None and split == "valid":
        num_samples = cfg.ddk.valid_samples_per_domain
    ckpt = describe_checkpoint(load)
    folder, iteration, meta = ckpt.folder, ckpt.iteration, ckpt.metadata
    model_cfg = eval_model(cfg, meta, folder)
    from_checkpoint = model_cfg is not cfg.model
    if from_checkpoint:
        cfg = static_checks(dataclasses.replace(cfg, model=model_cfg), ctx.world_size)
    manifest, tokenizer = builder.load_data_manifest(cfg)
    manifest.require_split(split)
    samples = build_heldout_samples(manifest, tokenizer, cfg.data.seq_length, cfg.data.cache_dir,
                                    split, num_samples)
    padded = meta.get("padded_vocab_size") or common_padded_vocab_size(
        cfg.model, None, manifest.vocab_size, ctx.tp_size)
    check_compatible(meta, to_dict(cfg.model), padded, manifest.tokenizer_hash, load)
    model = load_checkpoint_model(cfg.model, ctx, padded, ckpt, bf16=builder.use_bf16(cfg))
    res = evaluate_domains(
        DistillationPair(model, None), ctx, samples, micro_batch_size=cfg.train.micro_batch_size,
        seq_length=cfg.data.seq_length, vocab_size=manifest.vocab_size, with_teacher=False,
        chunk_tokens=cfg.distill.kl_chunk_tokens)
    prints = {name: s.fingerprint() for name, s in zip(manifest.names(), samples)} \
        if ctx.rank == 0 else {}
    domains = {name: {"loss": float(loss), "ppl": float(math.exp(loss)), "tokens": int(t),
                      "samples": len(s), "fingerprint": prints.get(name),
                      "sample_losses": [float(x) if math.isfinite(x) else None for x in per],
                      "sample_tokens": [int(x) for x in ntok]}
               for name, loss, t, s, per, ntok in zip(manifest.names(), res.student, res.tokens,
                                                      samples, res.student_samples,
                                                      res.sample_tokens)}
    return {"format": RESULT_FORMAT, "checkpoint": folder, "iteration": iteration,
            "split": split, "seq_length": int(cfg.data.seq_length),
            "samples_requested": num_samples, "manifest": manifest.path,
            "fingerprint": samples_fingerprint(split, cfg.data.seq_length, prints) if prints
            else None,
            "model": {"source": "checkpoint" if from_checkpoint else "config",
                      **{k: getattr(cfg.model, k) for k in ("num_layers", "hidden_size",
                                                            "num_attention_heads")}},
            "domains": domains}
