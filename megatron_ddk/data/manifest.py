"""The domain manifest: which Megatron-Core datasets make up each DDK domain.

One YAML file (written by `megatron-ddk build-domains`, documented in docs/data.md):

    version: 2
    tokenizer: {model: tokenizer/ddk.model, hash: "sha256:...", vocab_size: 8000}
    domains:
      - name: python_code
        train_prefixes: [python_code/train_text_document]
        valid_prefix: python_code/valid_text_document
        test_prefix: python_code/test_text_document
        num_train_tokens: 412345
        num_train_documents: 120
        num_valid_tokens: 16640
        num_valid_documents: 5
        num_test_tokens: 16702
        num_test_documents: 6
        num_train_sources: 118       # optional: distinct input documents behind each set
        num_valid_sources: 40
        num_test_sources: 41
        initial_weight: null

A "document" of a set is what the set's dataset holds: with `megatron-ddk build-domains`
--max-piece-bytes, a piece of an input document (docs/data.md); the *_sources counts say how
many distinct input documents the pieces came from.

Three disjoint sets per domain, three roles: train (the mixture draws from it), valid (DDK's
steering signal), test (reports only; nothing that trains or steers reads it). The test keys
are optional (all three or none); version 1 manifests (written before the test split existed)
are still read, without a test split, and asking one for its test split is an error saying how
to get one. Relative paths resolve against the manifest's folder. load_manifest checks
everything a training run would otherwise trip over much later (shape, unknown keys,
duplicates, missing, empty, truncated or corrupt datasets (dataset_files.check_dataset: .idx
header, .idx and .bin sizes), counts that disagree with the .idx files, the tokenizer hash)
and raises ValueError naming the manifest and the field. load_manifest_and_tokenizer adds what
needs the tokenizer (its file hash, its vocabulary size vs the manifest's) and is how a run
resolves its tokenizer. megatron.core is not imported here (data.tokenizer imports it, lazily);
of megatron_ddk: atomic, data.dataset_files, data.tokenizer (lazily).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import yaml

from megatron_ddk.atomic import write_atomic
from megatron_ddk.data.dataset_files import check_dataset, dataset_tokenizer

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1: train + valid only. Version 2 adds the optional test split."""
_TOP_KEYS = {"version", "tokenizer", "domains"}
_TOKENIZER_KEYS = {"model", "hash", "vocab_size"}
_COUNT_KEYS = ("num_train_tokens", "num_train_documents", "num_valid_tokens",
               "num_valid_documents")
_TEST_KEYS = ("test_prefix", "num_test_tokens", "num_test_documents")
_SOURCE_KEYS = ("num_train_sources", "num_valid_sources", "num_test_sources")
"""Optional: distinct input documents behind each set's documents (pieces)."""
_DOMAIN_KEYS = {"name", "train_prefixes", "valid_prefix", "initial_weight", *_COUNT_KEYS,
                *_SOURCE_KEYS}
SPLITS = ("valid", "test")
"""The held-out splits a domain can be evaluated on."""


@dataclass
class DomainEntry:
    """One domain: its training and validation datasets and their sizes."""

    name: str
    """Domain name, unique in the manifest (used in logs, metrics and weights)."""

    train_prefixes: List[str]
    """Megatron dataset prefixes (no .bin/.idx) of the training data; absolute after load."""

    valid_prefix: str
    """Megatron dataset prefix of the held-out validation documents; absolute after load."""

    num_train_tokens: int
    """Tokens in all training datasets, EOD tokens included."""

    num_train_documents: int
    """Documents in all training datasets."""

    num_valid_tokens: int
    """Tokens in the validation dataset, EOD tokens included."""

    num_valid_documents: int
    """Documents in the validation dataset."""

    initial_weight: Optional[float] = None
    """Optional starting mixture weight (used by ddk.initial_weights: manifest)."""

    test_prefix: Optional[str] = None
    """Megatron dataset prefix of the held-out test documents (reports only); None when the
    manifest has no test split (version 1)."""

    num_test_tokens: Optional[int] = None
    """Tokens in the test dataset, EOD tokens included (None without a test split)."""

    num_test_documents: Optional[int] = None
    """Documents in the test dataset (None without a test split)."""

    num_train_sources: Optional[int] = None
    """Distinct input documents the training documents came from (None: not recorded)."""

    num_valid_sources: Optional[int] = None
    """Distinct input documents the validation documents (pieces) came from."""

    num_test_sources: Optional[int] = None
    """Distinct input documents the test documents (pieces) came from."""

    def describe_sets(self) -> str:
        """'train 120 docs (118 sources) / 412345 tokens, valid ..., test ...'."""
        parts = []
        for split in ("train", "valid", "test"):
            docs = getattr(self, f"num_{split}_documents")
            if docs is None:
                continue
            srcs = getattr(self, f"num_{split}_sources")
            parts.append(f"{split} {docs} docs" + (f" ({srcs} sources)" if srcs is not None
                                                    else "")
                         + f" / {getattr(self, f'num_{split}_tokens')} tokens")
        return ", ".join(parts)

    def heldout_prefix(self, split: str) -> str:
        """The dataset prefix of a held-out split ('valid' or 'test'); ValueError when this
        domain has no such split."""
        if split == "valid":
            return self.valid_prefix
        if split == "test":
            if self.test_prefix is None:
                raise ValueError(f"domain {self.name} has no test split")
            return self.test_prefix
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


@dataclass
class DomainManifest:
    """All domains of a corpus and the tokenizer they were tokenized with."""

    path: str
    """The manifest file it was loaded from or last saved to ("" if not saved yet)."""

    tokenizer_model: str
    """Tokenizer model file (SentencePiece .model or tokenizer.json); absolute after load."""

    tokenizer_hash: str
    """'sha256:<hex>' of the tokenizer model file (megatron_ddk.data.tokenizer.tokenizer_hash)."""

    vocab_size: int
    """Tokenizer vocabulary size (before any padding of the embedding table)."""

    domains: List[DomainEntry] = field(default_factory=list)
    """The domains, in the order every per-domain vector (weights, losses) uses."""

    version: int = MANIFEST_VERSION
    """The file's format version (1: no test split; 2: optional test split)."""

    def has_test_split(self) -> bool:
        """Whether every domain has a test set."""
        return bool(self.domains) and all(d.test_prefix is not None for d in self.domains)

    def require_split(self, split: str) -> None:
        """ValueError, saying what to do, when the manifest cannot serve `split`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if split == "test" and not self.has_test_split():
            raise ValueError(
                f"manifest {self.path or '<unsaved>'} (version {self.version}) has no test "
                "split: rebuild it with `megatron-ddk build-domains` (it writes train, valid and "
                "test sets per domain), or evaluate on the validation set with --split valid")

    def names(self) -> List[str]:
        """Domain names in manifest order."""
        return [d.name for d in self.domains]

    def natural_weights(self) -> np.ndarray:
        """Each domain's share of the training tokens (float64, sums to 1)."""
        tokens = np.array([d.num_train_tokens for d in self.domains], dtype=np.float64)
        if tokens.size == 0 or tokens.sum() <= 0:
            raise ValueError(f"manifest {self.path or '<unsaved>'}: no training tokens, so no "
                             "natural weights")
        return tokens / tokens.sum()


def _fail(path: str, where: str, what: str) -> ValueError:
    return ValueError(f"manifest {path}: {where}: {what}")


def _check_keys(path: str, where: str, obj: Any, allowed: set, required: set) -> None:
    if not isinstance(obj, dict):
        raise _fail(path, where, f"expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(path, where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(obj))
    if missing:
        raise _fail(path, where, f"missing key(s) {missing}")


def _resolve(folder: str, prefix: Any, path: str, where: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise _fail(path, where, f"expected a non-empty path string, got {prefix!r}")
    return os.path.normpath(prefix if os.path.isabs(prefix) else os.path.join(folder, prefix))


def _check_int(path: str, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, where, f"expected a non-negative integer, got {value!r}")
    return value


def _dataset_counts(path: str, where: str, prefix: str, tokenizer: Tuple[str, int]) -> tuple:
    """(documents, tokens) of a dataset from its .idx; ValueError when a file is missing,
    truncated or corrupt (dataset_files.check_dataset), or when the dataset records another
    tokenizer than the manifest's (hash, vocab_size)."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise _fail(path, where, f"file {prefix}{suffix} does not exist; rebuild with "
                        "`megatron-ddk build-domains` or fix the path")
    try:
        counts = check_dataset(prefix)
        rec = dataset_tokenizer(prefix)
    except ValueError as err:
        raise _fail(path, where, f"{err} (`megatron-ddk build-domains`)") from None
    if rec is not None:
        found = (rec.get("tokenizer_hash") or tokenizer[0], rec["vocab_size"])
        if found != tuple(tokenizer):
            raise _fail(path, where, f"dataset {prefix} was built with tokenizer {found[0]} "
                        f"(vocabulary {found[1]}) but the manifest names {tokenizer[0]} "
                        f"(vocabulary {tokenizer[1]}): its token ids mean other text; rebuild "
                        "the datasets with the manifest's tokenizer (`megatron-ddk "
                        "build-domains`)")
    return counts


def check_vocab_size(manifest: "DomainManifest", tokenizer_vocab_size: int) -> None:
    """ValueError when the manifest's vocab_size is not the tokenizer's: too small would index
    past the embedding table, too large would silently build a bigger model."""
    if int(manifest.vocab_size) != int(tokenizer_vocab_size):
        raise ValueError(
            f"manifest {manifest.path or '<unsaved>'}: tokenizer.vocab_size is "
            f"{manifest.vocab_size} but the tokenizer {manifest.tokenizer_model} has "
            f"{tokenizer_vocab_size} entries; rebuild the domains with this tokenizer "
            f"(`megatron-ddk build-domains`), or set tokenizer.vocab_size: "
            f"{tokenizer_vocab_size} in the manifest if only that number is wrong")


def load_manifest_and_tokenizer(path: str) -> tuple:
    """(manifest, tokenizer) for a run: the manifest loaded and checked, its tokenizer file's
    hash compared with the manifest's, the tokenizer built and its vocabulary size compared
    with the manifest's (the one place a run resolves its tokenizer)."""
    from megatron_ddk.data.tokenizer import build_tokenizer, tokenizer_hash

    manifest = load_manifest(path)
    found = tokenizer_hash(manifest.tokenizer_model)
    if found != manifest.tokenizer_hash:
        raise ValueError(f"{path}: tokenizer {manifest.tokenizer_model} has hash {found} but the "
                         f"manifest records {manifest.tokenizer_hash}; the data were "
                         "preprocessed with another tokenizer: rebuild the domains")
    tokenizer = build_tokenizer(manifest.tokenizer_model)
    check_vocab_size(manifest, tokenizer.vocab_size)
    return manifest, tokenizer


def _parse_test(path: str, folder: str, where: str, raw: dict, version: int) -> dict:
    """The optional test keys of a domain: all three or none, version 2 only."""
    present = [k for k in _TEST_KEYS if k in raw]
    if not present:
        return {}
    if version < 2:
        raise _fail(path, where, f"{present} need manifest version 2 (the file says version "
                    f"{version}); set version: 2")
    missing = [k for k in _TEST_KEYS if k not in raw]
    if missing:
        raise _fail(path, where, f"has {present} but not {missing}: a test split needs all of "
                    f"{list(_TEST_KEYS)}")
    out = {"test_prefix": _resolve(folder, raw["test_prefix"], path, f"{where}.test_prefix")}
    for key in _TEST_KEYS[1:]:
        out[key] = _check_int(path, f"{where}.{key}", raw[key])
        if out[key] == 0:
            raise _fail(path, f"{where}.{key}", "is 0: the test set is empty; rebuild the "
                        "domains with a larger --test-samples or add data")
    return out


def _parse_domain(path: str, folder: str, i: int, raw: Any, version: int) -> DomainEntry:
    where = f"domains[{i}]"
    _check_keys(path, where, raw, _DOMAIN_KEYS | set(_TEST_KEYS),
                _DOMAIN_KEYS - {"initial_weight", *_SOURCE_KEYS})
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise _fail(path, f"{where}.name", f"expected a non-empty string, got {name!r}")
    where = f"domains[{i}] ({name})"
    prefixes = raw["train_prefixes"]
    if not isinstance(prefixes, list) or not prefixes:
        raise _fail(path, f"{where}.train_prefixes", "expected a non-empty list of prefixes")
    weight = raw.get("initial_weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or weight < 0):
        raise _fail(path, f"{where}.initial_weight", f"expected null or a number >= 0, got "
                    f"{weight!r}")
    entry = DomainEntry(
        name=name,
        train_prefixes=[_resolve(folder, p, path, f"{where}.train_prefixes[{j}]")
                        for j, p in enumerate(prefixes)],
        valid_prefix=_resolve(folder, raw["valid_prefix"], path, f"{where}.valid_prefix"),
        initial_weight=None if weight is None else float(weight),
        **{k: _check_int(path, f"{where}.{k}", raw[k]) for k in _COUNT_KEYS},
        **{k: _check_int(path, f"{where}.{k}", raw[k]) for k in _SOURCE_KEYS
           if raw.get(k) is not None},
        **_parse_test(path, folder, where, raw, version),
    )
    for key in _COUNT_KEYS:
        if getattr(entry, key) == 0:
            raise _fail(path, f"{where}.{key}", "is 0: the domain is empty; drop it or add data")
    return entry


def _check_counts(path: str, entry: DomainEntry, tokenizer: Tuple[str, int]) -> None:
    """The manifest's counts (and tokenizer) must match the datasets on disk."""
    where = f"domains ({entry.name})"
    docs = tokens = 0
    for j, prefix in enumerate(entry.train_prefixes):
        d, t = _dataset_counts(path, f"{where}.train_prefixes[{j}]", prefix, tokenizer)
        docs, tokens = docs + d, tokens + t
    vdocs, vtokens = _dataset_counts(path, f"{where}.valid_prefix", entry.valid_prefix,
                                     tokenizer)
    found = {"num_train_documents": docs, "num_train_tokens": tokens,
             "num_valid_documents": vdocs, "num_valid_tokens": vtokens}
    if entry.test_prefix is not None:
        tdocs, ttokens = _dataset_counts(path, f"{where}.test_prefix", entry.test_prefix,
                                         tokenizer)
        found.update(num_test_documents=tdocs, num_test_tokens=ttokens)
    for key, value in found.items():
        if getattr(entry, key) != value:
            raise _fail(path, f"{where}.{key}", f"says {getattr(entry, key)} but the datasets "
                        f"hold {value}; the manifest is stale, rebuild it")


def load_manifest(path: str, expected_tokenizer_hash: Optional[str] = None) -> DomainManifest:
    """Read and validate a manifest; paths in the result are absolute."""
    if os.path.isdir(path):
        raise ValueError(f"manifest {path} is a folder; give the manifest.yaml file inside it "
                         f"(written by `megatron-ddk build-domains`)")
    if not os.path.isfile(path):
        raise ValueError(f"manifest {path} does not exist; build one with `megatron-ddk "
                         "build-domains`")
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"manifest {path}: not valid YAML ({err})") from None
    _check_keys(path, "top level", raw, _TOP_KEYS, _TOP_KEYS)
    version = raw["version"]
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise _fail(path, "version", f"is {version!r}; this code reads versions "
                    f"{list(READABLE_VERSIONS)}")
    tok = raw["tokenizer"]
    _check_keys(path, "tokenizer", tok, _TOKENIZER_KEYS, _TOKENIZER_KEYS)
    if not isinstance(tok["hash"], str) or not tok["hash"].startswith("sha256:"):
        raise _fail(path, "tokenizer.hash", f"expected 'sha256:<hex>', got {tok['hash']!r}")
    vocab_size = _check_int(path, "tokenizer.vocab_size", tok["vocab_size"])
    if expected_tokenizer_hash is not None and tok["hash"] != expected_tokenizer_hash:
        raise _fail(path, "tokenizer.hash", f"expected {expected_tokenizer_hash} but found "
                    f"{tok['hash']}: the datasets were tokenized with a different tokenizer "
                    "than this run uses; rebuild them or use the manifest's tokenizer")
    domains_raw = raw["domains"]
    if not isinstance(domains_raw, list) or not domains_raw:
        raise _fail(path, "domains", "expected a non-empty list of domains")
    domains = [_parse_domain(path, folder, i, d, version) for i, d in enumerate(domains_raw)]
    with_test = [d.name for d in domains if d.test_prefix is not None]
    if with_test and len(with_test) != len(domains):
        raise _fail(path, "domains", f"only {with_test} have a test split; every domain needs "
                    "one or none does (rebuild with `megatron-ddk build-domains`)")
    names = [d.name for d in domains]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(path, "domains", f"duplicate domain name(s) {dupes}")
    for entry in domains:
        _check_counts(path, entry, (tok["hash"], vocab_size))
    return DomainManifest(
        path=path, tokenizer_model=_resolve(folder, tok["model"], path, "tokenizer.model"),
        tokenizer_hash=tok["hash"], vocab_size=vocab_size, domains=domains, version=version,
    )


def _relative(folder: str, target: str) -> str:
    """target relative to folder when it lies under folder or folder's parent (a corpus tree
    moved as a whole keeps working), else absolute."""
    target = os.path.abspath(target)
    parent = os.path.dirname(folder)
    if parent != os.path.dirname(parent) and os.path.commonpath([parent, target]) == parent:
        return os.path.relpath(target, folder)
    return target


def _to_yaml_dict(manifest: DomainManifest, folder: str) -> Dict[str, Any]:
    names = manifest.names()
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"manifest {manifest.path or '<unsaved>'}: duplicate domain name(s) "
                         f"{dupes}")
    with_test = [d.name for d in manifest.domains if d.test_prefix is not None]
    if with_test and len(with_test) != len(manifest.domains):
        raise ValueError(f"manifest {manifest.path or '<unsaved>'}: only {with_test} have a "
                         "test split; every domain needs one or none does")
    return {
        "version": MANIFEST_VERSION,
        "tokenizer": {"model": _relative(folder, manifest.tokenizer_model),
                      "hash": manifest.tokenizer_hash, "vocab_size": int(manifest.vocab_size)},
        "domains": [_domain_dict(d, folder) for d in manifest.domains],
    }


def _domain_dict(d: DomainEntry, folder: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {"name": d.name,
                           "train_prefixes": [_relative(folder, p) for p in d.train_prefixes],
                           "valid_prefix": _relative(folder, d.valid_prefix)}
    if d.test_prefix is not None:
        out["test_prefix"] = _relative(folder, d.test_prefix)
    out.update({k: int(getattr(d, k)) for k in _COUNT_KEYS})
    if d.test_prefix is not None:
        out.update(num_test_tokens=int(d.num_test_tokens),
                   num_test_documents=int(d.num_test_documents))
    out.update({k: int(getattr(d, k)) for k in _SOURCE_KEYS if getattr(d, k) is not None})
    out["initial_weight"] = None if d.initial_weight is None else float(d.initial_weight)
    return out


def save_manifest(manifest: DomainManifest, path: str) -> None:
    """Write the manifest as YAML atomically (temp file + os.replace); paths under the
    manifest's folder or its parent are stored relative to it. Sets manifest.path."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    text = yaml.safe_dump(_to_yaml_dict(manifest, folder), sort_keys=False,
                          allow_unicode=True, default_flow_style=False)
    write_atomic(path, text)  # also removes temporary files a killed writer left
    manifest.path = path
    manifest.version = MANIFEST_VERSION
    logger.info("wrote manifest %s (%d domains)", path, len(manifest.domains))
