"""Per-domain GPTDatasets: sample contents against the raw document stream, validation order,
the shared index cache (reused, built on one rank while the other waits), and collation of a
mixture batch into tensors."""

import glob
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_ddk.data.domain_datasets import build_domain_datasets
from megatron_ddk.data.manifest import DomainEntry, DomainManifest
from megatron_ddk.data.mixture import IntervalMixture, collate, micro_batches_for_rank
from megatron_ddk.testing import run_distributed

SEQ = 8
VOCAB = 200


class TinyTokenizer:
    """What GPTDatasetConfig / GPTDataset read from a tokenizer."""

    vocab_size = VOCAB
    eod = 0
    pad = 1
    unique_identifiers = {"class": "TinyTokenizer", "vocab_size": VOCAB}


def _write(prefix, docs):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


def _docs(rng, lo, hi, n, max_len):
    """n documents of ids in [lo, hi), each ending in EOD (0)."""
    return [list(rng.integers(lo, hi, size=rng.integers(3, max_len))) + [0] for _ in range(n)]


def make_manifest(folder, seed=0):
    """Domain 'a': two train prefixes, ids 10..99; domain 'b': one prefix, ids 100..199."""
    rng = np.random.default_rng(seed)
    raw = {}
    spec = {"a": ((10, 100), 2), "b": ((100, 200), 1)}
    domains = []
    for name, ((lo, hi), n_prefixes) in spec.items():
        train = []
        for j in range(n_prefixes):
            prefix = os.path.join(folder, f"{name}_train{j}")
            raw[prefix] = _docs(rng, lo, hi, 12, 20)
            _write(prefix, raw[prefix])
            train.append(prefix)
        valid = os.path.join(folder, f"{name}_valid")
        raw[valid] = _docs(rng, lo, hi, 10, 15)
        _write(valid, raw[valid])
        domains.append(DomainEntry(
            name=name, train_prefixes=train, valid_prefix=valid,
            num_train_tokens=sum(len(d) for p in train for d in raw[p]),
            num_train_documents=12 * n_prefixes, num_valid_tokens=sum(map(len, raw[valid])),
            num_valid_documents=10, initial_weight=None))
    manifest = DomainManifest(path="", tokenizer_model="", tokenizer_hash="sha256:0",
                              vocab_size=VOCAB, domains=domains)
    return manifest, raw


def _window(sample):
    """The s + 1 raw tokens a sample was cut from."""
    return tuple(sample["tokens"].tolist()) + (int(sample["labels"][-1]),)


def _stream_windows(docs, order, n):
    """Windows j*SEQ .. j*SEQ+SEQ of the documents concatenated in `order` (reference)."""
    stream = np.concatenate([docs[i] for i in order])
    return [tuple(stream[j * SEQ: j * SEQ + SEQ + 1].tolist()) for j in range(n)]


def test_samples_follow_the_document_stream(tmp_path):
    manifest, raw = make_manifest(str(tmp_path))
    ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, seed=5,
                               cache_dir=str(tmp_path / "cache"), valid_samples_per_domain=6)
    assert ds.names == ["a", "b"]
    for d, entry in enumerate(manifest.domains):
        expected_len = sum((sum(map(len, raw[p])) - 1) // SEQ for p in entry.train_prefixes)
        assert len(ds.train[d]) == expected_len == ds.num_train_samples[d]
        parts = ds.train[d].datasets if len(entry.train_prefixes) > 1 else [ds.train[d]]
        reference = []
        for part, prefix in zip(parts, entry.train_prefixes):
            reference += _stream_windows(raw[prefix], part.document_index, len(part))
        got = [_window(ds.train[d][i]) for i in range(len(ds.train[d]))]
        assert sorted(got) == sorted(reference)
        sample = ds.train[d][0]
        assert "attention_mask" not in sample
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert torch.all(sample["loss_mask"] == 1.0)
        # Validation: the first 6 windows of the stream, in order.
        valid = ds.valid[d]
        assert len(valid) == 6
        want = _stream_windows(raw[entry.valid_prefix], valid.dataset.document_index, 6)
        assert [_window(valid[j]) for j in range(6)] == want


def test_cache_is_written_once_and_reused(tmp_path):
    manifest, _ = make_manifest(str(tmp_path))
    cache = str(tmp_path / "cache")
    first = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4)
    files = sorted(glob.glob(os.path.join(cache, "*")))
    assert len([f for f in files if f.endswith("description.txt")]) == 5  # 3 train + 2 valid
    stamps = {f: os.path.getmtime(f) for f in files}
    second = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4)
    assert {f: os.path.getmtime(f) for f in glob.glob(os.path.join(cache, "*"))} == stamps
    for d in range(2):
        assert [_window(first.train[d][i]) for i in range(len(first.train[d]))] == \
            [_window(second.train[d][i]) for i in range(len(second.train[d]))]


def _two_rank_build(rank, world_size, manifest, cache):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4,
                               group=torch.distributed.group.WORLD)
    return [[_window(t[i]) for i in range(len(t))] for t in ds.train] + \
        [[_window(v[i]) for i in range(len(v))] for v in ds.valid]


def test_two_ranks_share_one_cache(tmp_path):
    manifest, _ = make_manifest(str(tmp_path))
    cache = str(tmp_path / "cache")
    per_rank = run_distributed(_two_rank_build, 2, manifest, cache, timeout=120)
    assert per_rank[0] == per_rank[1]
    assert len(glob.glob(os.path.join(cache, "*description.txt"))) == 5
    single = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, str(tmp_path / "c1"), 4)
    assert per_rank[0] == [[_window(t[i]) for i in range(len(t))] for t in single.train] + \
        [[_window(v[i]) for i in range(len(v))] for v in single.valid]


def test_collate_rank_slices_of_a_mixture_batch(tmp_path):
    manifest, _ = make_manifest(str(tmp_path))
    ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, str(tmp_path / "c"), 4)
    mix = IntervalMixture(ds.num_train_samples, global_batch_size=8, interval=2, seed=3)
    mix.start_interval([0.5, 0.5])
    batch = mix.next_global_batch()
    seen = []
    for rank in range(2):
        for micro in micro_batches_for_rank(batch, rank, 2, 2):
            out = collate(micro, ds.train)
            assert out["tokens"].shape == (2, SEQ) and out["tokens"].dtype == torch.int64
            assert out["labels"].dtype == torch.int64 and out["position_ids"].dtype == torch.int64
            assert out["loss_mask"].dtype == torch.float32 and "attention_mask" not in out
            assert out["domain_id"].tolist() == [d for d, _ in micro]
            for row, (d, s) in enumerate(micro):
                assert torch.equal(out["tokens"][row], ds.train[d][s]["tokens"])
                lo, hi = (10, 100) if d == 0 else (100, 200)
                assert all(t == 0 or lo <= t < hi for t in out["tokens"][row].tolist())
            seen += micro
    assert seen == batch
    with pytest.raises(ValueError, match="multiple"):
        micro_batches_for_rank(batch, 0, 3, 2)
