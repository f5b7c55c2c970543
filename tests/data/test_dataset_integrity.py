"""Broken datasets and a wrong vocabulary size are found when the manifest is loaded, named, and
explained: a truncated (or grown) .bin, a corrupt .idx header, a truncated .idx, a manifest
vocab_size that is not the tokenizer's (too small: an IndexError deep inside Megatron-Core; too
large: a silently bigger model). Datasets are written by Megatron-Core's own
IndexedDatasetBuilder and counted by its IndexedDataset (the independent reference)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from megatron_ddk.data.dataset_files import check_dataset
from megatron_ddk.data.manifest import (
    DomainEntry,
    DomainManifest,
    load_manifest,
    load_manifest_and_tokenizer,
    save_manifest,
)


def _dataset(prefix: str, docs, dtype=np.uint16) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.fixture
def built(tmp_path, tiny_tokenizer):
    """A one-domain manifest (vocab 800, the tiny tokenizer's) over real datasets."""
    from megatron_ddk.data.tokenizer import tokenizer_hash

    rng = np.random.default_rng(0)
    docs = {s: [list(rng.integers(0, 800, size=n)) for n in sizes]
            for s, sizes in (("train", [300, 200, 250]), ("valid", [90, 80]))}
    prefix = {s: str(tmp_path / "data" / "d" / s) for s in docs}
    for s in docs:
        _dataset(prefix[s], docs[s])
    entry = DomainEntry(name="d", train_prefixes=[prefix["train"]], valid_prefix=prefix["valid"],
                        num_train_tokens=750, num_train_documents=3, num_valid_tokens=170,
                        num_valid_documents=2)
    manifest = DomainManifest(path="", tokenizer_model=tiny_tokenizer,
                              tokenizer_hash=tokenizer_hash(tiny_tokenizer), vocab_size=800,
                              domains=[entry])
    path = str(tmp_path / "data" / "manifest.yaml")
    save_manifest(manifest, path)
    return path, prefix


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_check_dataset_counts_match_megatron(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for docs in ([[1, 2, 3], [4], [5, 6]], []):
        prefix = str(tmp_path / f"ds{len(docs)}")
        _dataset(prefix, docs, dtype)
        ds = IndexedDataset(prefix, mmap=False)
        assert check_dataset(prefix) == (len(ds.document_indices) - 1,
                                         int(np.sum(ds.sequence_lengths)))


def _edit(path: str, data: bytes = b"", offset: int = 0, truncate: int = 0, append=b"") -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if data:
            f.seek(offset)
            f.write(data)
        if truncate:
            f.truncate(size - truncate)
        if append:
            f.seek(0, 2)
            f.write(append)


@pytest.mark.parametrize("suffix, edit, message", [
    (".bin", dict(truncate=3), r"bin holds 1497 bytes but .*train\.idx describes 750 tokens of 2 "
                               r"bytes \(1500 bytes\): the \.bin is truncated; rebuild"),
    (".bin", dict(append=b"xx"), r"the \.bin is longer than its index"),
    (".idx", dict(data=b"NOTANIDX!"), r"train\.idx is not a Megatron-Core index \(its first "
                                      r"bytes are b'NOTANIDX!'.*corrupt"),
    (".idx", dict(data=b"\x04", offset=17), r"train\.idx describes 750 tokens of 4 bytes "
                                            r"\(3000 bytes\)"),  # dtype uint16 -> int32
    (".idx", dict(data=b"\x09", offset=17), r"train\.idx: index version 1 / dtype code 9 "
                                            r"\(expected"),
    (".idx", dict(truncate=8), r"train\.idx holds \d+ bytes but its header \(3 sequences, 4 "
                               r"document boundaries\) implies \d+: the file is truncated"),
])
def test_broken_dataset_is_named_at_load(built, suffix, edit, message):
    path, prefix = built
    load_manifest(path)
    _edit(prefix["train"] + suffix, **edit)
    with pytest.raises(ValueError, match=rf"manifest {path}: domains \(d\)\.train_prefixes\[0\]: "
                       r".*" + message):
        load_manifest(path)


def test_dataset_broken_after_load_is_named_when_opened(built, tmp_path):
    from megatron_ddk.data.domain_datasets import build_domain_datasets

    path, prefix = built
    manifest, tokenizer = load_manifest_and_tokenizer(path)
    _edit(prefix["valid"] + ".bin", truncate=2)
    with pytest.raises(ValueError, match=rf"{path}: d\.valid_prefix: .*valid\.bin holds 338 "
                       r"bytes .* truncated"):
        build_domain_datasets(manifest, tokenizer, seq_length=16, seed=1,
                              cache_dir=str(tmp_path / "cache"), valid_samples_per_domain=2)


@pytest.mark.parametrize("vocab", [799, 801, 32000])
def test_manifest_vocab_size_must_be_the_tokenizers(built, vocab):
    path, _ = built
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["tokenizer"]["vocab_size"] = vocab
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    with pytest.raises(ValueError, match=rf"manifest {path}: tokenizer\.vocab_size is {vocab} "
                       rf"but the tokenizer .*tiny\.model has 800 entries; rebuild the domains "
                       rf".*or set tokenizer\.vocab_size: 800"):
        load_manifest_and_tokenizer(path)


def test_matching_manifest_and_tokenizer_load(built):
    path, _ = built
    manifest, tokenizer = load_manifest_and_tokenizer(path)
    assert manifest.vocab_size == tokenizer.vocab_size == 800
