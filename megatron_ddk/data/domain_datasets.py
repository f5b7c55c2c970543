"""Per-domain Megatron-Core GPTDatasets, built once per run (the mixture indexes into them).

For every domain of the manifest:
- train: one epoch of samples over its train prefixes (a GPTDataset per prefix, concatenated when
  there are several). IntervalMixture shuffles sample ids per epoch on top, so the GPTDataset's
  own sample shuffle only fixes which tokens form a sample.
- valid: the first valid_samples_per_domain samples of its valid prefix in sample order (no
  sample shuffle; the documents are in GPTDataset's order, fixed by valid_seed, so every run of
  any seed evaluates on the same samples).

GPTDatasetConfig: create_attention_mask=False (no [s, s] masks are materialised; the model builds
its causal mask), reset_position_ids / reset_attention_mask / eod_mask_loss False. The index
caches (.npy) go to one shared cache folder: the rank of `group` that is global rank 0 builds them
(GPTDataset writes caches only on global rank 0) while the others wait on a barrier, then the
others load them. group=None means the default group when torch.distributed is initialised, and
a plain single-process build otherwise.

Imports megatron.core datasets; nothing from megatron_ddk beyond the manifest types.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, List

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_ddk.data.manifest import DomainManifest

logger = logging.getLogger(__name__)


class ValidationSamples(torch.utils.data.Dataset):
    """The first `num_samples` samples of a GPTDataset in sample-index order (its shuffle undone).

    GPTDataset[i] reads sample shuffle_index[i]; reading at the inverse permutation gives samples
    0, 1, 2, ... of the sample index: consecutive windows of the document stream.
    """

    def __init__(self, dataset: GPTDataset, num_samples: int) -> None:
        self.dataset = dataset
        shuffle = np.asarray(dataset.shuffle_index)
        inverse = np.empty(shuffle.size, dtype=np.int64)
        inverse[shuffle] = np.arange(shuffle.size, dtype=np.int64)
        self._positions = inverse[:min(int(num_samples), shuffle.size)]

    def __len__(self) -> int:
        return int(self._positions.size)

    def __getitem__(self, idx: int):
        return self.dataset[int(self._positions[idx])]


@dataclass
class DomainDatasets:
    """The training and validation datasets of every domain, in manifest order."""

    names: List[str]
    """Domain names, manifest order."""

    train: List[Any] = field(default_factory=list)
    """Per domain: one epoch of training samples (GPTDataset, or ConcatDataset over prefixes)."""

    valid: List[ValidationSamples] = field(default_factory=list)
    """Per domain: the validation samples used to measure perplexity."""

    @property
    def num_train_samples(self) -> List[int]:
        """Samples in one epoch of each domain's training data (IntervalMixture's sizes)."""
        return [len(ds) for ds in self.train]


def dataset_config(tokenizer: Any, seq_length: int, seed: int, cache_dir: str,
                   manifest: DomainManifest) -> GPTDatasetConfig:
    """GPTDatasetConfig for the domain datasets (no attention masks, no resets, no EOD masking)."""
    return GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend_per_split=[
            ([p for d in manifest.domains for p in d.train_prefixes], None),
            ([d.valid_prefix for d in manifest.domains], None),
            None,
        ],
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )


def _samples_in(low_level: IndexedDataset, seq_length: int) -> int:
    """Samples in one epoch (Megatron: drop the last partial window, one extra label token)."""
    tokens = int(np.sum(low_level.sequence_lengths, dtype=np.int64))
    return max(0, (tokens - 1) // seq_length)


def _gpt_dataset(prefix: str, split: Split, config: GPTDatasetConfig, where: str):
    """A one-epoch GPTDataset over all documents of `prefix`, or None if it holds no sample."""
    if not IndexedDataset.exists(prefix):
        raise ValueError(f"{where}: dataset {prefix}.bin/.idx does not exist; rebuild the domains "
                         f"(tools/build_domains.py) or fix the manifest")
    low = GPTDataset.build_low_level_dataset(prefix, config)
    if _samples_in(low, config.sequence_length) == 0:
        return None
    docs = np.arange(GPTDataset.numel_low_level_dataset(low), dtype=np.int32)
    return GPTDataset(low, prefix, docs, None, split, config)


def _build_all(manifest: DomainManifest, train_cfg: GPTDatasetConfig,
               valid_cfg: GPTDatasetConfig, valid_samples: int) -> DomainDatasets:
    out = DomainDatasets(names=manifest.names())
    src = manifest.path or "<manifest>"
    for d in manifest.domains:
        parts = []
        for j, prefix in enumerate(d.train_prefixes):
            where = f"{src}: {d.name}.train_prefixes[{j}]"
            ds = _gpt_dataset(prefix, Split.train, train_cfg, where)
            if ds is None:
                logger.warning("domain %s: %s holds fewer than seq_length + 1 tokens; skipped",
                               d.name, prefix)
            else:
                parts.append(ds)
        if not parts:
            raise ValueError(f"{src}: domain {d.name} has no training sample of "
                             f"{train_cfg.sequence_length} tokens; lower data.seq_length or add "
                             f"data")
        out.train.append(parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts))
        vds = _gpt_dataset(d.valid_prefix, Split.valid, valid_cfg, f"{src}: {d.name}.valid_prefix")
        if vds is None:
            raise ValueError(f"{src}: domain {d.name}'s validation set has no sample of "
                             f"{valid_cfg.sequence_length} tokens; lower data.seq_length or add "
                             f"validation documents")
        valid = ValidationSamples(vds, valid_samples)
        if len(valid) < valid_samples:
            logger.warning("domain %s: validation set has %d samples, fewer than "
                           "ddk.valid_samples_per_domain=%d; using all", d.name, len(valid),
                           valid_samples)
        out.valid.append(valid)
    return out


def _on_builder_first(build: Callable[[], DomainDatasets], group) -> DomainDatasets:
    """Run `build` on the group's member that is global rank 0, barrier, then on the rest."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("build_domain_datasets: a process group was given but "
                             "torch.distributed is not initialised")
        return build()
    group = group if group is not None else dist.group.WORLD
    try:
        builder = dist.get_group_rank(group, 0)
    except (ValueError, RuntimeError):
        raise ValueError("build_domain_datasets: the process group must contain global rank 0 "
                         "(Megatron-Core writes dataset index caches only there)") from None
    me = dist.get_rank(group)
    result = build() if me == builder else None
    dist.barrier(group=group)
    if me != builder:
        result = build()
    return result


def build_domain_datasets(manifest: DomainManifest, tokenizer: Any, seq_length: int, seed: int,
                          cache_dir: str, valid_samples_per_domain: int, group=None,
                          valid_seed: int = 0) -> DomainDatasets:
    """Build every domain's train and validation datasets (see the module docstring).

    Args:
        manifest: the loaded domain manifest (paths absolute).
        tokenizer: a Megatron-Core tokenizer (eod, pad, vocab_size, unique_identifiers).
        seq_length: tokens per sample (data.seq_length).
        seed: run seed; fixes which tokens form each training sample.
        cache_dir: shared folder for the .npy index caches (all ranks must see it).
        valid_samples_per_domain: ddk.valid_samples_per_domain.
        group: ranks that build together (None: the default group, or single process).
        valid_seed: fixes the validation document order, independent of the run seed.
    """
    if seq_length < 1 or valid_samples_per_domain < 1:
        raise ValueError(f"seq_length={seq_length}, valid_samples_per_domain="
                         f"{valid_samples_per_domain}: both must be >= 1")
    if not cache_dir:
        raise ValueError("build_domain_datasets: cache_dir (data.cache_dir) is required: a "
                         "folder every rank can read")
    train_cfg = dataset_config(tokenizer, seq_length, seed, cache_dir, manifest)
    valid_cfg = dataset_config(tokenizer, seq_length, valid_seed, cache_dir, manifest)
    datasets = _on_builder_first(
        lambda: _build_all(manifest, train_cfg, valid_cfg, valid_samples_per_domain), group)
    logger.info("domain datasets: %s", ", ".join(
        f"{n}: {t} train / {len(v)} valid samples" for n, t, v in
        zip(datasets.names, datasets.num_train_samples, datasets.valid)))
    return datasets
