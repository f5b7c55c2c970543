"""Per-domain Megatron-Core GPTDatasets, built once per run (the mixture indexes into them).

For every domain of the manifest:
- train: one epoch of samples over its train prefixes (a GPTDataset per prefix, concatenated when
  there are several). IntervalMixture shuffles sample ids per epoch on top, so the GPTDataset's
  own sample shuffle only fixes which tokens form a sample.
- valid: the first valid_samples_per_domain samples of its valid prefix in sample order (no
  sample shuffle; the documents are in GPTDataset's order, fixed by valid_seed, so every run of
  any seed evaluates on the same samples).
- test (build_heldout_samples, only when asked: `megatron-ddk eval`): the same construction over
  the test prefix. build_domain_datasets, which training uses, never builds or reads it.

GPTDatasetConfig: create_attention_mask=False (no [s, s] masks are materialised; the model builds
its causal mask), reset_position_ids / reset_attention_mask / eod_mask_loss False.

The index caches (.npy) go to one cache folder, by default <manifest folder>/cache, shared by
every run of that manifest (the file names hash the dataset, seed and sequence length). Within a
run, the rank of `group` that is global rank 0 builds them (GPTDataset writes caches only on
global rank 0) while the others wait on a barrier, then the others load them; group=None means
the default group when torch.distributed is initialised, and a plain single-process build
otherwise. Across runs, the builder holds an exclusive flock on <cache>/.lock while it builds:
GPTDataset writes its four files in place, and a second run reading (or rewriting) them half-way
would load a truncated index. A builder killed mid-write leaves a marker naming the files that
existed before it started; the next builder removes the files that are not on that list.

Every dataset is checked (dataset_files.check_dataset: .idx header, .idx and .bin sizes) before
Megatron-Core opens it, so a file truncated or overwritten since the manifest was loaded is named.

Imports megatron.core datasets; from megatron_ddk only the manifest types and
data.dataset_files.check_dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_ddk.atomic import write_atomic
from megatron_ddk.data.dataset_files import check_dataset
from megatron_ddk.data.manifest import DomainManifest

logger = logging.getLogger(__name__)


class ValidationSamples(torch.utils.data.Dataset):
    """The first `num_samples` samples of a GPTDataset in sample-index order (its shuffle undone);
    the held-out samples of one domain (valid or test).

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

    def fingerprint(self) -> str:
        """'sha256:<hex>' of every sample's seq_length + 1 token window, in order: equal exactly
        when two evaluations read the same tokens in the same samples."""
        digest = hashlib.sha256()
        for i in range(len(self)):
            sample = self[i]
            window = torch.cat([sample["tokens"], sample["labels"][-1:]]).to(torch.int64)
            digest.update(window.numpy().tobytes())
        return "sha256:" + digest.hexdigest()


HeldOutSamples = ValidationSamples
"""The same class serves the test split."""


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
                         f"(`megatron-ddk build-domains`) or fix the manifest")
    try:
        check_dataset(prefix)  # a truncated .bin / corrupt .idx: named here, not deep inside
    except ValueError as err:
        raise ValueError(f"{where}: {err} (`megatron-ddk build-domains`)") from None
    low = GPTDataset.build_low_level_dataset(prefix, config)
    if _samples_in(low, config.sequence_length) == 0:
        return None
    docs = np.arange(GPTDataset.numel_low_level_dataset(low), dtype=np.int32)
    return GPTDataset(low, prefix, docs, None, split, config)


def _heldout(entry, split: str, cfg: GPTDatasetConfig, num_samples: Optional[int],
             src: str, what: str) -> ValidationSamples:
    """The first num_samples (None: all) samples of one domain's held-out split."""
    prefix = entry.heldout_prefix(split)
    ds = _gpt_dataset(prefix, Split.valid if split == "valid" else Split.test, cfg,
                      f"{src}: {entry.name}.{split}_prefix")
    if ds is None:
        raise ValueError(f"{src}: domain {entry.name}'s {split} set has no sample of "
                         f"{cfg.sequence_length} tokens; lower data.seq_length or rebuild the "
                         f"domains with more {split} samples")
    samples = ValidationSamples(ds, len(ds) if num_samples is None else num_samples)
    if num_samples is not None and len(samples) < num_samples:
        logger.warning("domain %s: %s set has %d samples, fewer than %s=%d; using all",
                       entry.name, split, len(samples), what, num_samples)
    return samples


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
        out.valid.append(_heldout(d, "valid", valid_cfg, valid_samples, src,
                                  "ddk.valid_samples_per_domain"))
    return out


_LOCK_FILE = ".lock"
_BUILDING_FILE = ".building"


def default_cache_dir(manifest: DomainManifest) -> str:
    """<manifest folder>/cache: one index cache per manifest, shared by its runs."""
    if not manifest.path:
        raise ValueError("the manifest was never saved, so it has no folder for the dataset "
                         "cache; set data.cache_dir")
    return os.path.join(os.path.dirname(os.path.abspath(manifest.path)), "cache")


def resolve_cache_dir(manifest: DomainManifest, cache_dir: Optional[str]) -> str:
    """The index-cache folder of this manifest's datasets. Megatron-Core keys its caches by
    dataset path, not content, so a rebuild must never meet an old cache: the default folder is
    cleared by build-domains when it replaces the datasets; under a given data.cache_dir every
    build of the datasets gets its own subfolder, named by a fingerprint of the manifest file
    and of every .idx file's size and modification time (a rebuild writes new .idx files)."""
    if not cache_dir:
        return default_cache_dir(manifest)
    digest = hashlib.sha256()
    if manifest.path and os.path.isfile(manifest.path):
        with open(manifest.path, "rb") as f:
            digest.update(f.read())
    for d in manifest.domains:
        for prefix in [*d.train_prefixes, d.valid_prefix, d.test_prefix]:
            if prefix and os.path.isfile(prefix + ".idx"):
                st = os.stat(prefix + ".idx")
                digest.update(f"{prefix}:{st.st_size}:{st.st_mtime_ns};".encode())
    return os.path.join(cache_dir, f"datasets-{digest.hexdigest()[:16]}")


def _recover_interrupted_build(cache_dir: str) -> None:
    """Remove what a builder killed mid-write left (files not named by its marker)."""
    marker = os.path.join(cache_dir, _BUILDING_FILE)
    if not os.path.exists(marker):
        return
    try:
        with open(marker) as f:
            before = set(json.load(f))
    except (OSError, ValueError):
        before = None  # unreadable marker: keep everything rather than guess
    if before is not None:
        stale = [n for n in os.listdir(cache_dir)
                 if n not in before and n not in (_LOCK_FILE, _BUILDING_FILE)]
        for name in stale:
            os.remove(os.path.join(cache_dir, name))
        logger.warning("dataset cache %s: a build was interrupted; removed %d file(s) it had "
                       "started: %s", cache_dir, len(stale), ", ".join(sorted(stale)) or "-")
    os.remove(marker)


@contextlib.contextmanager
def cache_lock(cache_dir: str) -> Iterator[None]:
    """Hold <cache_dir>/.lock exclusively (waiting for another run's build), clean up after an
    interrupted build, and mark this build until it finishes."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise ValueError(f"dataset cache folder {cache_dir} cannot be created ({err.strerror}); "
                         "set data.cache_dir to a folder every rank can write") from None
    try:
        fd = os.open(os.path.join(cache_dir, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:  # a read-only folder of prebuilt caches can still be read
        logger.warning("dataset cache %s is not writable (%s): reading it without a lock; an "
                       "index it lacks cannot be written there (set data.cache_dir)", cache_dir,
                       err.strerror)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("dataset cache %s: another run is building it; waiting", cache_dir)
            start = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_EX)
            logger.info("dataset cache %s: waited %.1fs", cache_dir, time.perf_counter() - start)
        _recover_interrupted_build(cache_dir)
        marker = os.path.join(cache_dir, _BUILDING_FILE)
        write_atomic(marker, json.dumps(sorted(os.listdir(cache_dir))))
        yield
        os.remove(marker)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _on_builder_first(build: Callable[[], Any], group, cache_dir: str) -> Any:
    """Run `build` under the cache lock on the group's member that is global rank 0, barrier,
    then on the rest."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("build_domain_datasets: a process group was given but "
                             "torch.distributed is not initialised")
        with cache_lock(cache_dir):
            return build()
    group = group if group is not None else dist.group.WORLD
    try:
        builder = dist.get_group_rank(group, 0)
    except (ValueError, RuntimeError):
        raise ValueError("build_domain_datasets: the process group must contain global rank 0 "
                         "(Megatron-Core writes dataset index caches only there)") from None
    me = dist.get_rank(group)
    result = None
    if me == builder:
        with cache_lock(cache_dir):
            result = build()
    dist.barrier(group=group)
    if me != builder:
        result = build()
    return result


def _check_args(seq_length: int, num_samples: Optional[int], what: str) -> None:
    if seq_length < 1 or (num_samples is not None and num_samples < 1):
        raise ValueError(f"seq_length={seq_length}, {what}={num_samples}: both must be >= 1")


def build_domain_datasets(manifest: DomainManifest, tokenizer: Any, seq_length: int, seed: int,
                          cache_dir: Optional[str], valid_samples_per_domain: int, group=None,
                          valid_seed: int = 0) -> DomainDatasets:
    """Build every domain's train and validation datasets (see the module docstring). Never
    builds or reads the test split.

    Args:
        manifest: the loaded domain manifest (paths absolute).
        tokenizer: a Megatron-Core tokenizer (eod, pad, vocab_size, unique_identifiers).
        seq_length: tokens per sample (data.seq_length).
        seed: run seed; fixes which tokens form each training sample.
        cache_dir: shared folder for the .npy index caches (all ranks must see it); None:
            default_cache_dir(manifest) (resolve_cache_dir).
        valid_samples_per_domain: ddk.valid_samples_per_domain.
        group: ranks that build together (None: the default group, or single process).
        valid_seed: fixes the validation document order, independent of the run seed.
    """
    _check_args(seq_length, valid_samples_per_domain, "valid_samples_per_domain")
    cache_dir = resolve_cache_dir(manifest, cache_dir)
    train_cfg = dataset_config(tokenizer, seq_length, seed, cache_dir, manifest)
    valid_cfg = dataset_config(tokenizer, seq_length, valid_seed, cache_dir, manifest)
    datasets = _on_builder_first(
        lambda: _build_all(manifest, train_cfg, valid_cfg, valid_samples_per_domain), group,
        cache_dir)
    logger.info("domain datasets: %s", ", ".join(
        f"{n}: {t} train / {len(v)} valid samples" for n, t, v in
        zip(datasets.names, datasets.num_train_samples, datasets.valid)))
    return datasets


def build_heldout_samples(manifest: DomainManifest, tokenizer: Any, seq_length: int,
                          cache_dir: Optional[str], split: str,
                          num_samples: Optional[int] = None, group=None,
                          valid_seed: int = 0) -> List[ValidationSamples]:
    """Every domain's held-out samples of `split` ('valid' or 'test'), manifest order: the
    first num_samples of each (None: all its samples), in the same fixed order as training's
    validation samples (valid_seed, independent of any run seed). Builds no training data.
    ValueError when the manifest has no such split."""
    manifest.require_split(split)
    _check_args(seq_length, num_samples, "num_samples")
    cache_dir = resolve_cache_dir(manifest, cache_dir)
    cfg = dataset_config(tokenizer, seq_length, valid_seed, cache_dir, manifest)
    src = manifest.path or "<manifest>"
    return _on_builder_first(
        lambda: [_heldout(d, split, cfg, num_samples, src, "the requested samples")
                 for d in manifest.domains], group, cache_dir)
