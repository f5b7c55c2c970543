"""megatron_ddk.data.manifest: YAML round trip, relative paths, natural weights, and every
validation error with its message."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from megatron_ddk.data.manifest import (
    DomainEntry,
    DomainManifest,
    load_manifest,
    save_manifest,
)

HASH = "sha256:" + "ab" * 32


def _dataset(prefix: str, docs) -> None:
    """A real .bin/.idx with the given documents (lists of token ids)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.fixture
def built(tmp_path):
    """A saved two-domain manifest over real datasets; returns (path, manifest)."""
    root = tmp_path / "data"
    sizes = {"code": ([[1, 2, 3], [4, 5]], [[6, 7]], [[8, 8], [8]]),
             "prose": ([[1] * 10, [2] * 5, [3] * 5], [[9, 9, 9]], [[7] * 4])}
    domains = []
    for name, (train_docs, valid_docs, test_docs) in sizes.items():
        train, valid = str(root / name / "train"), str(root / name / "valid")
        test = str(root / name / "test")
        _dataset(train, train_docs)
        _dataset(valid, valid_docs)
        _dataset(test, test_docs)
        domains.append(DomainEntry(
            name=name, train_prefixes=[train], valid_prefix=valid,
            num_train_tokens=sum(map(len, train_docs)), num_train_documents=len(train_docs),
            num_valid_tokens=sum(map(len, valid_docs)), num_valid_documents=len(valid_docs),
            initial_weight=0.25 if name == "code" else None, test_prefix=test,
            num_test_tokens=sum(map(len, test_docs)), num_test_documents=len(test_docs)))
    tok = tmp_path / "tok" / "t.model"
    tok.parent.mkdir()
    tok.write_bytes(b"x")
    manifest = DomainManifest(path="", tokenizer_model=str(tok), tokenizer_hash=HASH,
                              vocab_size=800, domains=domains)
    path = str(root / "manifest.yaml")
    save_manifest(manifest, path)
    return path, manifest


def test_round_trip_and_relative_paths(built):
    path, manifest = built
    raw = yaml.safe_load(open(path))
    assert raw["version"] == 2
    assert raw["domains"][0]["train_prefixes"] == ["code/train"]  # inside: relative
    assert raw["domains"][0]["test_prefix"] == "code/test"
    assert (raw["domains"][0]["num_test_tokens"], raw["domains"][0]["num_test_documents"]) == (3, 2)
    assert raw["tokenizer"]["model"] == "../tok/t.model"  # sibling folder: still relative
    assert raw["domains"][1]["initial_weight"] is None
    loaded = load_manifest(path, expected_tokenizer_hash=HASH)
    assert loaded.path == os.path.abspath(path) == manifest.path
    assert loaded.domains == manifest.domains
    assert loaded.names() == ["code", "prose"]
    assert (loaded.tokenizer_model, loaded.tokenizer_hash, loaded.vocab_size) == (
        manifest.tokenizer_model, HASH, 800)
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]


def test_far_paths_stay_absolute(built, tmp_path):
    path, manifest = built
    manifest.tokenizer_model = "/opt/models/elsewhere/tokenizer.model"
    save_manifest(manifest, path)
    assert yaml.safe_load(open(path))["tokenizer"]["model"] == manifest.tokenizer_model
    assert load_manifest(path).tokenizer_model == manifest.tokenizer_model


def test_relative_paths_resolve_against_manifest_folder(built, tmp_path, monkeypatch):
    path, _ = built
    monkeypatch.chdir(tmp_path / "tok")  # somewhere else entirely
    loaded = load_manifest(os.path.relpath(path))
    assert loaded.domains[1].valid_prefix == str(tmp_path / "data" / "prose" / "valid")


def test_natural_weights(built):
    weights = load_manifest(built[0]).natural_weights()
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, [5 / 25, 20 / 25])
    assert weights.sum() == pytest.approx(1.0)


def _edit(path, fn):
    raw = yaml.safe_load(open(path))
    fn(raw)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)


@pytest.mark.parametrize("edit, pattern", [
    (lambda r: r.update(extra=1), r"top level: unknown key\(s\) \['extra'\]"),
    (lambda r: r.pop("tokenizer"), r"top level: missing key\(s\) \['tokenizer'\]"),
    (lambda r: r.update(version=3), r"version: is 3; this code reads versions \[1, 2\]"),
    (lambda r: r.update(version=1), r"domains\[0\] \(code\): \['test_prefix', "
     r"'num_test_tokens', 'num_test_documents'\] need manifest version 2"),
    (lambda r: r["domains"][1].pop("num_test_documents"),
     r"domains\[1\] \(prose\): has \['test_prefix', 'num_test_tokens'\] but not "
     r"\['num_test_documents'\]"),
    (lambda r: [r["domains"][1].pop(k) for k in ("test_prefix", "num_test_tokens",
                                                  "num_test_documents")],
     r"domains: only \['code'\] have a test split; every domain needs one or none does"),
    (lambda r: r["domains"][0].update(num_test_tokens=0),
     r"domains\[0\] \(code\).num_test_tokens: is 0: the test set is empty"),
    (lambda r: r["domains"][1].update(num_test_tokens=5),
     r"domains \(prose\).num_test_tokens: says 5 but the datasets hold 4; the manifest is "
     r"stale"),
    (lambda r: r["tokenizer"].update(merges="m"), r"tokenizer: unknown key\(s\) \['merges'\]"),
    (lambda r: r["tokenizer"].update(hash="md5:1"), r"tokenizer.hash: expected 'sha256:<hex>'"),
    (lambda r: r["domains"][0].update(wieght=1), r"domains\[0\]: unknown key\(s\) \['wieght'\]"),
    (lambda r: r["domains"][1].update(name="code"),
     r"domains: duplicate domain name\(s\) \['code'\]"),
    (lambda r: r["domains"][1].update(num_valid_documents=0),
     r"domains\[1\] \(prose\).num_valid_documents: is 0: the domain is empty"),
    (lambda r: r["domains"][0].update(num_train_tokens=-1),
     r"domains\[0\] \(code\).num_train_tokens: expected a non-negative integer, got -1"),
    (lambda r: r["domains"][0].update(train_prefixes=[]),
     r"domains\[0\] \(code\).train_prefixes: expected a non-empty"),
    (lambda r: r["domains"][0].update(num_train_tokens=6),
     r"domains \(code\).num_train_tokens: says 6 but the datasets hold 5; the manifest is stale"),
    (lambda r: r.update(domains=[]), r"domains: expected a non-empty list"),
])
def test_validation_errors_name_manifest_and_field(built, edit, pattern):
    path, _ = built
    _edit(path, edit)
    with pytest.raises(ValueError, match=r"manifest .*manifest\.yaml: " + pattern):
        load_manifest(path)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_missing_dataset_file(built, suffix):
    path, manifest = built
    os.remove(manifest.domains[1].valid_prefix + suffix)
    with pytest.raises(ValueError, match=r"manifest .*: domains \(prose\).valid_prefix: file "
                       rf".*prose/valid\{suffix} does not exist"):
        load_manifest(path)


def test_missing_test_dataset_file(built):
    path, manifest = built
    os.remove(manifest.domains[0].test_prefix + ".bin")
    with pytest.raises(ValueError, match=r"domains \(code\).test_prefix: file .*code/test\.bin "
                       "does not exist"):
        load_manifest(path)


def test_version_1_manifest_is_read_without_a_test_split(built):
    """A manifest written before the test split existed still trains and evaluates on valid;
    asking it for its test split is an error saying how to get one."""
    path, _ = built

    def to_v1(raw):
        raw["version"] = 1
        for d in raw["domains"]:
            for key in ("test_prefix", "num_test_tokens", "num_test_documents"):
                d.pop(key)

    _edit(path, to_v1)
    loaded = load_manifest(path)
    assert loaded.version == 1 and not loaded.has_test_split()
    assert all(d.test_prefix is None and d.num_test_tokens is None for d in loaded.domains)
    loaded.require_split("valid")
    assert loaded.domains[0].heldout_prefix("valid") == loaded.domains[0].valid_prefix
    with pytest.raises(ValueError, match=r"manifest .*manifest\.yaml \(version 1\) has no test "
                       r"split: rebuild it with `megatron-ddk build-domains` .* --split valid"):
        loaded.require_split("test")
    with pytest.raises(ValueError, match="domain code has no test split"):
        loaded.domains[0].heldout_prefix("test")
    with pytest.raises(ValueError, match=r"unknown split 'train'"):
        loaded.require_split("train")
    save_manifest(loaded, path)  # re-saved: version 2 without test keys, still loads
    raw = yaml.safe_load(open(path))
    assert raw["version"] == 2 and "test_prefix" not in raw["domains"][0]
    assert not load_manifest(path).has_test_split()


def test_tokenizer_hash_mismatch_names_both_hashes(built):
    path, _ = built
    other = "sha256:" + "cd" * 32
    with pytest.raises(ValueError) as err:
        load_manifest(path, expected_tokenizer_hash=other)
    message = str(err.value)
    assert path in message and other in message and HASH in message
    assert "tokenizer.hash" in message


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ValueError, match="manifest .*absent.yaml does not exist"):
        load_manifest(str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="is a folder; give the manifest.yaml file inside it"):
        load_manifest(str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_manifest(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="bad.yaml: top level: expected a mapping, got list"):
        load_manifest(str(bad))


def test_natural_weights_need_tokens():
    m = DomainManifest(path="", tokenizer_model="t", tokenizer_hash=HASH, vocab_size=1,
                       domains=[])
    with pytest.raises(ValueError, match="no training tokens"):
        m.natural_weights()
