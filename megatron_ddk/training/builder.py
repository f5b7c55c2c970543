"""Everything a run is made of, built once from the config: data, models, loss, optimizer, DDK.

Kept apart from the loop (trainer.py) so the eval command and tests can build the same pieces.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_ddk.config import RunConfig, to_dict, train_iters
from megatron_ddk.data.domain_datasets import DomainDatasets, build_domain_datasets
from megatron_ddk.data.manifest import DomainManifest, load_manifest
from megatron_ddk.data.tokenizer import build_tokenizer, tokenizer_hash
from megatron_ddk.models.build import build_gpt_model
from megatron_ddk.models.checkpoint import read_metadata, resolve_checkpoint
from megatron_ddk.models.pair import DistillationPair
from megatron_ddk.models.teacher import build_teacher
from megatron_ddk.models.vocab import check_tokenizer_hashes, common_padded_vocab_size
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.config.optional import have_cuda

logger = logging.getLogger(__name__)


def use_bf16(cfg: RunConfig) -> bool:
    """train.bf16, or bf16 exactly when a GPU is present."""
    return have_cuda() if cfg.train.bf16 is None else cfg.train.bf16


@dataclass
class DataParts:
    """The manifest, its tokenizer and the per-domain datasets."""

    manifest: DomainManifest
    tokenizer: Any
    tokenizer_hash: str
    vocab_size: int
    datasets: DomainDatasets


def build_data(cfg: RunConfig, ctx: ParallelContext, valid_samples: int) -> DataParts:
    """Load the manifest (tokenizer hash checked) and build every domain's datasets once."""
    if not cfg.data.manifest:
        raise ValueError("data.manifest is not set: give the domain manifest YAML written by "
                         "tools/build_domains.py")
    manifest = load_manifest(cfg.data.manifest)
    found = tokenizer_hash(manifest.tokenizer_model)
    if found != manifest.tokenizer_hash:
        raise ValueError(f"{cfg.data.manifest}: tokenizer {manifest.tokenizer_model} has hash "
                         f"{found} but the manifest records {manifest.tokenizer_hash}; the data "
                         f"were preprocessed with another tokenizer: rebuild the domains")
    tokenizer = build_tokenizer(manifest.tokenizer_model)
    cache = cfg.data.cache_dir or os.path.join(cfg.logging.run_dir, "cache")
    datasets = build_domain_datasets(manifest, tokenizer, cfg.data.seq_length, cfg.train.seed,
                                     cache, valid_samples, group=None)
    return DataParts(manifest, tokenizer, manifest.tokenizer_hash, manifest.vocab_size, datasets)


def _checkpoint_hash(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    folder, _ = resolve_checkpoint(path)
    return read_metadata(folder).get("tokenizer_hash")


def model_vocab(cfg: RunConfig, vocab_size: int, tp_size: int) -> int:
    """The common padded vocabulary size of student and teacher."""
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
                         f"{vocab_size} entries; remove model.vocab_size or fix the manifest")
    return common_padded_vocab_size(cfg.model, cfg.distill.teacher, vocab_size, tp_size)


def build_models(cfg: RunConfig, ctx: ParallelContext, padded_vocab: int,
                 data_hash: Optional[str], load: Optional[str]):
    """(student stage, frozen teacher stage or None, pair) on this rank."""
    check_tokenizer_hashes(_checkpoint_hash(load), _checkpoint_hash(cfg.distill.teacher_load),
                           data_hash)
    bf16 = use_bf16(cfg)
    student = build_gpt_model(cfg.model, ctx, padded_vocab, bf16=bf16,
                              sequence_parallel=cfg.parallel.sequence_parallel)
    teacher = None
    if cfg.distill.teacher is not None:
        teacher = build_teacher(cfg.distill.teacher, ctx, padded_vocab, cfg.distill.teacher_load,
                                bf16=bf16, tokenizer_hash=data_hash)
    return student, teacher, DistillationPair(student, teacher)


def num_iters(cfg: RunConfig) -> int:
    """Optimizer steps of the run (from train_iters or train_tokens)."""
    return int(train_iters(cfg))


def checkpoint_metadata(cfg: RunConfig, padded_vocab: int, data: DataParts) -> dict:
    """What models/checkpoint.py records beside every checkpoint of the student."""
    return {"model": to_dict(cfg.model), "padded_vocab_size": padded_vocab,
            "tokenizer_hash": data.tokenizer_hash, "vocab_size": data.vocab_size,
            "domains": data.manifest.names()}
