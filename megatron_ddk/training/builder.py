"""Everything a run is made of, built once from the config: data, models, loss, optimizer, DDK.

Kept apart from the loop (trainer.py) so the eval command and tests can build the same pieces.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch.distributed as dist

from megatron_ddk.config import RunConfig, to_dict, train_iters
from megatron_ddk.config.optional import have_cuda
from megatron_ddk.data.domain_datasets import DomainDatasets, build_domain_datasets
from megatron_ddk.data.manifest import DomainManifest, load_manifest_and_tokenizer
from megatron_ddk.models.build import build_gpt_model
from megatron_ddk.models.checkpoint_layout import ResolvedCheckpoint
from megatron_ddk.models.teacher import build_teacher
from megatron_ddk.models.vocab import check_tokenizer_hashes, common_padded_vocab_size
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training.prepare import RunCheckpoints
from megatron_ddk.training.run_folder import run_id
from megatron_ddk.training.teacher_source import (
    OnlineTeacher,
    StoredTeacher,
    TeacherSource,
    open_store,
    source_kind,
)

logger = logging.getLogger(__name__)


def use_bf16(cfg: RunConfig) -> bool:
    """train.bf16, or bf16 exactly when a GPU is present (true on a CPU host runs bf16 too)."""
    return have_cuda() if cfg.train.bf16 is None else cfg.train.bf16


def float16_wrap(module, bf16: bool):
    """Megatron-Core's Float16Module around `module` (the pair) when bf16 is on, else `module`.

    The wrapper casts the parameters (teacher included) to bf16; the optimizer keeps fp32 main
    parameters and DDP fp32 main gradients. Its outputs stay bf16 (fp32_output=False): the loss
    computes every vocabulary chunk in fp32 itself (losses/kl.py), so no fp32 copy of the student's
    and the teacher's logits is ever made.
    """
    if not bf16:
        return module
    return _bf16_logits_module()(module.config, module)


@functools.lru_cache(maxsize=None)
def _bf16_logits_module():
    """The Float16Module subclass (one class; Megatron-Core is imported on first use)."""
    from megatron.core.transformer.module import Float16Module

    class Bf16LogitsModule(Float16Module):
        """Float16Module whose last stage returns the logits in bf16."""

        def forward(self, *inputs, fp32_output=False, **kwargs):
            return super().forward(*inputs, fp32_output=fp32_output, **kwargs)

    return Bf16LogitsModule


@dataclass
class DataParts:
    """The manifest, its tokenizer and the per-domain datasets."""

    manifest: DomainManifest
    tokenizer: Any
    tokenizer_hash: str
    vocab_size: int
    datasets: DomainDatasets


def load_data_manifest(cfg: RunConfig):
    """(manifest, tokenizer): the manifest loaded with its tokenizer's hash and vocabulary size
    checked (data.manifest.load_manifest_and_tokenizer)."""
    if not cfg.data.manifest:
        raise ValueError("data.manifest is not set: give the domain manifest YAML written by "
                         "`megatron-ddk build-domains`")
    return load_manifest_and_tokenizer(cfg.data.manifest)


def build_data(cfg: RunConfig, ctx: ParallelContext, valid_samples: int) -> DataParts:
    """Load the manifest (tokenizer hash checked) and build every domain's train and valid
    datasets once (never the test split). data.cache_dir None: the manifest's own cache."""
    manifest, tokenizer = load_data_manifest(cfg)
    datasets = build_domain_datasets(manifest, tokenizer, cfg.data.seq_length, cfg.train.seed,
                                     cfg.data.cache_dir, valid_samples, group=None)
    return DataParts(manifest, tokenizer, manifest.tokenizer_hash, manifest.vocab_size, datasets)


def model_vocab(cfg: RunConfig, vocab_size: int, tp_size: int) -> int:
    """The common padded vocabulary size of student and teacher."""
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
                         f"{vocab_size} entries; remove model.vocab_size or fix the manifest")
    return common_padded_vocab_size(cfg.model, cfg.distill.teacher, vocab_size, tp_size)


def build_models(cfg: RunConfig, ctx: ParallelContext, padded_vocab: int, data: DataParts,
                 checkpoints: RunCheckpoints) -> Tuple[Any, TeacherSource]:
    """(student stage, teacher source) on this rank: the teacher built once, of the kind the
    config names (training/teacher_source.py); student, teacher and data share one tokenizer."""
    kind = source_kind(cfg)
    resume, teacher_ckpt = checkpoints.resume, checkpoints.teacher
    check_tokenizer_hashes(resume.tokenizer_hash if resume else None,
                           teacher_ckpt.tokenizer_hash if teacher_ckpt and kind == "online"
                           else None, data.tokenizer_hash)
    bf16 = use_bf16(cfg)
    student = build_gpt_model(cfg.model, ctx, padded_vocab, bf16=bf16,
                              sequence_parallel=cfg.parallel.sequence_parallel)
    if kind == "offline":  # no teacher model: its top-K is read from the store
        return student, StoredTeacher(open_store(cfg, data, teacher_ckpt))
    if kind == "online":  # resolved by models/teacher_config.py before the static checks
        teacher = build_teacher(cfg.distill.teacher, ctx, padded_vocab,
                                teacher_ckpt or cfg.distill.teacher_load, bf16=bf16,
                                tokenizer_hash=data.tokenizer_hash)
        return student, OnlineTeacher(teacher, cfg.distill.teacher)
    return student, TeacherSource()


def num_iters(cfg: RunConfig) -> int:
    """Optimizer steps of the run (from train_iters or train_tokens)."""
    return int(train_iters(cfg))


def _shared_run_id(cfg: RunConfig, resume: Optional[ResolvedCheckpoint]) -> str:
    """run_folder.run_id, rank 0's on every rank (a fresh id is random)."""
    value = [run_id(cfg, resume)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def checkpoint_metadata(cfg: RunConfig, padded_vocab: int, data: DataParts,
                        resume: Optional[ResolvedCheckpoint] = None) -> dict:
    """What models/checkpoint.py records beside every checkpoint of the student; run_id marks
    the iterations this run writes (keep_last prunes only those). All ranks call it."""
    return {"model": to_dict(cfg.model), "padded_vocab_size": padded_vocab,
            "tokenizer_hash": data.tokenizer_hash, "vocab_size": data.vocab_size,
            "tokenizer_model": data.manifest.tokenizer_model,  # export_hf's default tokenizer
            "domains": data.manifest.names(), "run_id": _shared_run_id(cfg, resume)}
