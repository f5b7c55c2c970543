"""Per-domain GPTDatasets: sample contents against the raw document stream, validation and test
order, the shared index cache (reused, built on one rank while the other waits, one per manifest
by default, locked against concurrent runs, recovered after a killed build), and collation of a
mixture batch into tensors."""

import glob
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_ddk.data.domain_datasets import (
    build_domain_datasets,
    build_heldout_samples,
    cache_lock,
    default_cache_dir,
    resolve_cache_dir,
)
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


def _cached(manifest, cache):
    """Where the index caches of `manifest` under a given data.cache_dir go."""
    return resolve_cache_dir(manifest, cache)


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
        test = os.path.join(folder, f"{name}_test")
        raw[test] = _docs(rng, lo, hi, 9, 15)
        _write(test, raw[test])
        domains.append(DomainEntry(
            name=name, train_prefixes=train, valid_prefix=valid,
            num_train_tokens=sum(len(d) for p in train for d in raw[p]),
            num_train_documents=12 * n_prefixes, num_valid_tokens=sum(map(len, raw[valid])),
            num_valid_documents=10, initial_weight=None, test_prefix=test,
            num_test_tokens=sum(map(len, raw[test])), num_test_documents=9))
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
    files = sorted(glob.glob(os.path.join(_cached(manifest, cache), "*")))
    assert len([f for f in files if f.endswith("description.txt")]) == 5  # 3 train + 2 valid
    stamps = {f: os.path.getmtime(f) for f in files}
    second = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4)
    files = glob.glob(os.path.join(_cached(manifest, cache), "*"))
    assert {f: os.path.getmtime(f) for f in files} == stamps
    for d in range(2):
        assert [_window(first.train[d][i]) for i in range(len(first.train[d]))] == \
            [_window(second.train[d][i]) for i in range(len(second.train[d]))]


def _two_rank_build(rank, world_size, manifest, cache):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4,
                               group=torch.distributed.group.WORLD)
    test = build_heldout_samples(manifest, TinyTokenizer(), SEQ, cache, "test", 5,
                                 group=torch.distributed.group.WORLD)  # eval's path at DP=2
    return [[_window(t[i]) for i in range(len(t))] for t in ds.train] + \
        [[_window(v[i]) for i in range(len(v))] for v in ds.valid] + \
        [[_window(t[i]) for i in range(len(t))] for t in test]


def test_two_ranks_share_one_cache(tmp_path):
    manifest, _ = make_manifest(str(tmp_path))
    cache = str(tmp_path / "cache")
    per_rank = run_distributed(_two_rank_build, 2, manifest, cache, timeout=300)
    assert per_rank[0] == per_rank[1]
    descriptions = glob.glob(os.path.join(_cached(manifest, cache), "*description.txt"))
    assert len(descriptions) == 5 + 2  # + 2 test
    single = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, str(tmp_path / "c1"), 4)
    test = build_heldout_samples(manifest, TinyTokenizer(), SEQ, str(tmp_path / "c1"), "test", 5)
    assert per_rank[0] == [[_window(t[i]) for i in range(len(t))] for t in single.train] + \
        [[_window(v[i]) for i in range(len(v))] for v in single.valid] + \
        [[_window(t[i]) for i in range(len(t))] for t in test]


def _windows(samples):
    return [_window(samples[i]) for i in range(len(samples))]


def test_test_split_follows_the_stream_and_training_never_reads_it(tmp_path):
    manifest, raw = make_manifest(str(tmp_path))
    cache = str(tmp_path / "cache")
    for d in manifest.domains:  # training must not need the test files at all
        for suffix in (".bin", ".idx"):
            os.rename(d.test_prefix + suffix, d.test_prefix + suffix + ".away")
    trained = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 6)
    assert not glob.glob(os.path.join(_cached(manifest, cache), "*-test-*"))
    for d in manifest.domains:
        for suffix in (".bin", ".idx"):
            os.rename(d.test_prefix + suffix + ".away", d.test_prefix + suffix)
    test = build_heldout_samples(manifest, TinyTokenizer(), SEQ, cache, "test")
    three = build_heldout_samples(manifest, TinyTokenizer(), SEQ, cache, "test", 3)
    valid = build_heldout_samples(manifest, TinyTokenizer(), SEQ, cache, "valid", 6)
    for d, entry in enumerate(manifest.domains):
        n_all = (sum(map(len, raw[entry.test_prefix])) - 1) // SEQ  # all samples by default
        want = _stream_windows(raw[entry.test_prefix], test[d].dataset.document_index, n_all)
        assert _windows(test[d]) == want and _windows(three[d]) == want[:3]
        ref = hashlib.sha256(b"".join(np.array(w, dtype=np.int64).tobytes() for w in want))
        assert test[d].fingerprint() == "sha256:" + ref.hexdigest()
        assert three[d].fingerprint() != test[d].fingerprint()
        # valid for eval = the samples training evaluates on (fixed order, any run seed)
        assert _windows(valid[d]) == _windows(trained.valid[d])
        assert valid[d].fingerprint() != test[d].fingerprint()
    assert glob.glob(os.path.join(_cached(manifest, cache), "*-GPTDataset-test-description.txt"))


def test_test_split_of_a_manifest_without_one(tmp_path):
    manifest, _ = make_manifest(str(tmp_path))
    for d in manifest.domains:
        d.test_prefix = d.num_test_tokens = d.num_test_documents = None
    manifest.version, manifest.path = 1, str(tmp_path / "old.yaml")
    with pytest.raises(ValueError, match=r"old\.yaml \(version 1\) has no test split: rebuild "
                       r"it with `megatron-ddk build-domains`"):
        build_heldout_samples(manifest, TinyTokenizer(), SEQ, str(tmp_path / "c"), "test")
    assert len(build_heldout_samples(manifest, TinyTokenizer(), SEQ, str(tmp_path / "c"),
                                     "valid", 2)[0]) == 2


def test_default_cache_is_one_per_manifest(tmp_path):
    manifest, _ = make_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="never saved.*set data.cache_dir"):
        build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, None, 4)
    manifest.path = str(tmp_path / "manifest.yaml")  # only its folder matters
    assert default_cache_dir(manifest) == str(tmp_path / "cache")
    build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, None, 4)
    build_heldout_samples(manifest, TinyTokenizer(), SEQ, None, "test")
    assert len(glob.glob(str(tmp_path / "cache" / "*description.txt"))) == 5 + 2
    locked = tmp_path / "ro"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: nothing to check then
        return
    with pytest.raises(ValueError, match="cache folder .*ro/cache cannot be created"):
        build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, str(locked / "cache"), 4)


def test_read_only_prebuilt_cache_is_read_without_a_lock(tmp_path, monkeypatch, caplog):
    manifest, _ = make_manifest(str(tmp_path))
    cache = str(tmp_path / "cache")
    first = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4)
    os.remove(os.path.join(_cached(manifest, cache), ".lock"))
    from megatron_ddk.data import domain_datasets

    real_open = os.open

    def refuse_lock(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(domain_datasets.os, "open", refuse_lock)
    with caplog.at_level("WARNING"):
        again = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4)
    assert "is not writable (Permission denied): reading it without a lock" in caplog.text
    assert [_windows(t) for t in again.train] == [_windows(t) for t in first.train]


def _wait_for(path):
    import time

    while not os.path.exists(path):
        time.sleep(0.05)


def _separate_runs(rank, world_size, manifest, root):
    """Two separate runs (no process group) on one cache, in two phases.

    A: rank 0 holds the cache lock for 3 s (a run building); rank 1 starts building the same
    cache meanwhile. B: both start building a fresh cache at the same moment."""
    import time

    out = {}
    cache = os.path.join(root, "a", "cache")
    if rank == 0:
        with cache_lock(_cached(manifest, cache)):
            open(os.path.join(root, "held"), "w").close()
            time.sleep(3.0)
            out["during"] = sorted(glob.glob(os.path.join(_cached(manifest, cache), "*.npy")))
            out["released"] = time.time()
    else:
        _wait_for(os.path.join(root, "held"))
        ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4)
        out["finished"] = time.time()
        out["a"] = [_windows(t) for t in ds.train] + [_windows(v) for v in ds.valid]
    open(os.path.join(root, f"ready{rank}"), "w").close()
    _wait_for(os.path.join(root, f"ready{1 - rank}"))
    ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, os.path.join(root, "b"), 4)
    out["b"] = [_windows(t) for t in ds.train] + [_windows(v) for v in ds.valid]
    return out


def test_separate_runs_share_a_cache_safely(tmp_path):
    manifest, _ = make_manifest(str(tmp_path))
    single = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, str(tmp_path / "c1"), 4)
    reference = [_windows(t) for t in single.train] + [_windows(v) for v in single.valid]
    first, second = run_distributed(_separate_runs, 2, manifest, str(tmp_path), timeout=300)
    # A: the waiting run wrote nothing while the lock was held, then built the right indexes
    assert first["during"] == [] and second["finished"] > first["released"]
    assert second["a"] == reference
    # B: two runs building at once both read complete, identical indexes
    assert first["b"] == second["b"] == reference
    b = resolve_cache_dir(manifest, str(tmp_path / "b"))
    assert len(glob.glob(os.path.join(b, "*description.txt"))) == 5
    assert not os.path.exists(os.path.join(b, ".building"))


def test_build_killed_mid_write_is_cleaned_up(tmp_path):
    """A builder killed while writing leaves a truncated index that looks like a cache hit;
    the marker lets the next builder remove it and rebuild."""
    manifest, _ = make_manifest(str(tmp_path))
    cache = str(tmp_path / "cache")
    build_domain_datasets(manifest, TinyTokenizer(), SEQ, 5, cache, 4)
    before = sorted(os.listdir(_cached(manifest, cache)))
    other = str(tmp_path / "other")
    reference = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 6, other, 4)
    with open(os.path.join(_cached(manifest, cache), ".building"), "w") as f:
        json.dump(before, f)  # what a seed-6 builder would have recorded, then died
    other = resolve_cache_dir(manifest, other)
    for name in os.listdir(other):
        if name.startswith(".") or "-valid-" in name:
            continue
        data = open(os.path.join(other, name), "rb").read()
        if name.endswith("shuffle_index.npy"):
            data = data[:len(data) // 2]  # cut mid-write
        with open(os.path.join(_cached(manifest, cache), name), "wb") as f:
            f.write(data)
    rebuilt = build_domain_datasets(manifest, TinyTokenizer(), SEQ, 6, cache, 4)
    assert [_windows(t) for t in rebuilt.train] == [_windows(t) for t in reference.train]
    assert not os.path.exists(os.path.join(_cached(manifest, cache), ".building"))


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


def test_a_given_cache_dir_is_never_reused_across_a_rebuild(tmp_path):
    """data.cache_dir: the same datasets find their cache again; rebuilt datasets (new .idx
    files, here with other documents of the same counts) get a fresh subfolder, so
    Megatron-Core never reads an index cache of the old ones."""
    import time

    os.makedirs(tmp_path / "d")
    manifest, raw = make_manifest(str(tmp_path / "d"))
    cache = str(tmp_path / "cache")
    first = resolve_cache_dir(manifest, cache)
    assert first == resolve_cache_dir(manifest, cache) and first.startswith(cache + os.sep)
    ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, seed=5, cache_dir=cache,
                               valid_samples_per_domain=6)
    before = [tuple(ds.train[0][i]["tokens"].tolist()) for i in range(3)]
    time.sleep(0.01)
    prefix = manifest.domains[0].train_prefixes[0]
    shuffled = [list(reversed(doc[:-1])) + [0] for doc in raw[prefix]]  # same lengths
    _write(prefix, shuffled)
    second = resolve_cache_dir(manifest, cache)
    assert second != first
    ds = build_domain_datasets(manifest, TinyTokenizer(), SEQ, seed=5, cache_dir=cache,
                               valid_samples_per_domain=6)
    after = [tuple(ds.train[0][i]["tokens"].tolist()) for i in range(3)]
    assert after != before  # the new documents, not a cached view of the old ones
    manifest.path = str(tmp_path / "d" / "manifest.yaml")
    assert resolve_cache_dir(manifest, None) == default_cache_dir(manifest)
