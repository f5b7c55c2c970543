"""The offline teacher store: the teacher's top-K log-probabilities keyed by (domain, sample id).

One teacher pass (tools/cache_teacher_logits.py, training/teacher_cache.py) writes it; any KD or
DDK run whose samples it covers reads it instead of running the teacher, whatever its mixture
weights (design.md, "Teacher signal"). Layout of a store folder DIR:

    DIR/header.json                     identity, K, T, dtypes, coverage, teacher valid losses
    DIR/<domain>/covered.npy            [n] int64: the covered sample ids, in the run's draw order
    DIR/<domain>/shard_000000/          shard j: covered ids [j*S, (j+1)*S), renamed into place
        sample_ids.npy    [m] int64     whole (a crash leaves shard_000000.tmp, never a half
        checksums.npy     [m] uint32    shard; a rerun redoes it)
        topk_ids.npy      [m, s, K]     uint16 when the vocabulary fits, else int32
        topk_logprobs.npy [m, s, K]     float16 (default) or float32: log p_T at temperature T
        rest_logprob.npy  [m, s]        float32: log of the teacher's mass outside the K ids

Every .npy is memory-mapped by the reader; a token costs K x (2 or 4) + K x (2 or 4) + 4 bytes.
Coverage: with --max-samples-per-domain N a domain's store holds the first N sample ids of the
run's epoch-0 draw order (mixture.domain_sample_order): any mixture draws a domain's samples in
that order, so N bounds what a run may draw from it (tools/simulate_mixture.py reports it).

The identity (teacher checkpoint fingerprint, teacher shape, tokenizer hash, seq_length,
temperature, seed, vocabulary, domains and their sizes, validation set size) is compared with the
run's field by field; each sample's token checksum is compared with the batch the run collates.
A mismatch or an uncovered (domain, sample) is a ValueError that names it: never a silent
fallback. header.json's "complete" turns true only after the last shard and the teacher's
per-domain validation losses (DDK's ppl_T) are written.

Imports numpy, torch and data.mixture only; must not import models, losses or training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ddk.data.mixture import IntervalMixture, domain_sample_order

FORMAT_VERSION = 1
HEADER_FILE = "header.json"
ARRAYS = ("sample_ids", "checksums", "topk_ids", "topk_logprobs", "rest_logprob")
IDENTITY_FIELDS = ("teacher_fingerprint", "teacher_model", "tokenizer_hash", "seq_length",
                   "temperature", "seed", "vocab_size", "domains", "num_train_samples",
                   "valid_samples_per_domain")
_HINTS = {
    "teacher_fingerprint": "distill.teacher_load is another checkpoint than the store's teacher",
    "teacher_model": "distill.teacher describes another architecture than the store's teacher",
    "tokenizer_hash": "the data were tokenized with another tokenizer",
    "seq_length": "data.seq_length differs (samples are cut differently)",
    "temperature": "distill.temperature differs (the log-probabilities are stored at the "
                   "store's T)",
    "seed": "train.seed differs (it fixes which tokens form each sample and the draw order)",
    "vocab_size": "the tokenizer's vocabulary differs",
    "domains": "the manifest's domains differ",
    "num_train_samples": "the domains' training data differ",
    "valid_samples_per_domain": "ddk.valid_samples_per_domain differs (the stored teacher "
                                "validation losses were measured on another number of samples)",
}


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def bytes_per_token(top_k: int, vocab_size: int, logprob_dtype: str = "float16") -> int:
    """Store bytes per token: K ids + K log-probabilities + the rest's log-mass (fp32)."""
    return top_k * (id_dtype(vocab_size).itemsize + np.dtype(logprob_dtype).itemsize) + 4


def max_samples_per_domain(sizes: Sequence[int], global_batch_size: int, interval: int,
                           steps: int, policy: str, weights: Optional[Sequence[float]] = None,
                           alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """The most samples of each domain a run can draw: what --max-samples-per-domain must cover.

    static / equal (fixed weights, `weights` for static): exact, by running the interval mixture.
    ddk / ddk_no_smoothing: interval 0 draws with `weights` (its initial sampling), exactly;
    every later interval at most ceil(w_max x interval x global_batch_size) per domain, with
    w_max = alpha + (1 - alpha) / N under Eq. 2's smoothing and 1 without it (any weights the
    run may choose). Capped at the domain's size: a second epoch re-draws the same ids.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = sizes.size
    fixed = np.full(n, 1.0 / n) if policy == "equal" or weights is None else np.asarray(weights)
    mix = IntervalMixture(sizes, global_batch_size, interval, seed)
    first = steps if policy in ("static", "equal") else min(steps, interval)
    for t in range(-(-first // interval)):
        k = min(interval, first - t * interval)
        mix.start_interval(fixed, num_steps=k)
        mix.advance(k)
    need = mix.samples_consumed.astype(np.float64)
    if policy not in ("static", "equal"):
        w_max = min(1.0, alpha + (1.0 - alpha) / n) if policy == "ddk" else 1.0
        for t in range(1, -(-steps // interval)):
            k = min(interval, steps - t * interval)
            need += np.ceil(w_max * k * global_batch_size)
    return np.minimum(need, sizes).astype(np.int64)


def sample_checksum(tokens) -> int:
    """crc32 of a sample's input token ids (as int64), the store's guard against other data."""
    arr = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    return zlib.crc32(np.ascontiguousarray(arr, dtype=np.int64).tobytes())


def checkpoint_fingerprint(folder: str, block: int = 1 << 16) -> str:
    """A fingerprint of a checkpoint's iteration folder: sha256 over every file's relative path,
    size and sampled content (its first, last and 14 evenly spaced 64 KiB blocks), so it reads
    ~1 MiB per file whatever the checkpoint's size. Any retrained weights change it."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            h.update(f"{os.path.relpath(path, folder)}\0{size}\0".encode())
            with open(path, "rb") as f:
                for off in sorted({min(max(0, size - block), i * size // 15) for i in range(16)}):
                    f.seek(off)
                    h.update(f.read(block))
    return "sha256:" + h.hexdigest()


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(root: str) -> dict:
    """The store's header.json; a ValueError naming the folder when there is none."""
    path = os.path.join(root, HEADER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{root} is not a teacher store (no {HEADER_FILE}); build one with "
                         f"tools/cache_teacher_logits.py --config RUN.yaml --out {root}")
    with open(path) as f:
        header = json.load(f)
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {header.get('format_version')} is not "
                         f"{FORMAT_VERSION}; rebuild the store with this release")
    return header


def identity_errors(stored: dict, run: dict, where: str) -> List[str]:
    """One message per identity field where the store and the run differ (None: not checked)."""
    errs = []
    for key in IDENTITY_FIELDS:
        mine, theirs = run.get(key), stored.get(key)
        if mine is None or theirs is None or mine == theirs:
            continue
        show = (lambda v: v) if not isinstance(mine, dict) else (
            lambda v: {k: v.get(k) for k in sorted(set(mine) | set(theirs))
                       if mine.get(k) != theirs.get(k)})
        errs.append(f"{key}: store {show(theirs)!r} vs run {show(mine)!r} ({_HINTS[key]})")
    return [f"teacher store {where} does not match this run: " + "; ".join(errs)] if errs else []


def shard_dir(root: str, domain: str, index: int) -> str:
    return os.path.join(root, domain, f"shard_{index:06d}")


class StoreWriter:
    """Writes a store: the header first (complete: false), shards atomically, then finish().

    A folder that already holds a header of the same plan (identity, K, dtypes, coverage) is
    resumed: shards already renamed into place are kept. Another plan is refused.
    """

    def __init__(self, root: str, identity: dict, top_k: int, logprob_dtype: str,
                 shard_samples: int, covered: Dict[str, np.ndarray], extra: Optional[dict] = None):
        if logprob_dtype not in ("float16", "float32"):
            raise ValueError(f"logprob dtype {logprob_dtype!r}: use float16 or float32")
        self.root = root
        vocab = int(identity["vocab_size"])
        self.dtypes = {"sample_ids": "int64", "checksums": "uint32",
                       "topk_ids": id_dtype(vocab).name, "topk_logprobs": logprob_dtype,
                       "rest_logprob": "float32"}
        self.header = {
            "format_version": FORMAT_VERSION, "complete": False, "identity": identity,
            "top_k": int(top_k), "dtypes": self.dtypes, "shard_samples": int(shard_samples),
            "bytes_per_token": bytes_per_token(top_k, vocab, logprob_dtype),
            "domains": {name: {"num_covered": int(len(ids)),
                               "num_shards": -(-len(ids) // shard_samples),
                               "covered_sha256": hashlib.sha256(
                                   np.asarray(ids, np.int64).tobytes()).hexdigest()}
                        for name, ids in covered.items()},
            "valid_losses": None, **(extra or {})}
        self.covered = covered

    def _plan(self, header: dict) -> dict:
        return {k: header.get(k) for k in ("identity", "top_k", "dtypes", "shard_samples",
                                           "domains")}

    def begin(self) -> bool:
        """Write (or check) the header and covered ids; True when an earlier run is resumed."""
        path = os.path.join(self.root, HEADER_FILE)
        resumed = os.path.isfile(path)
        if resumed:
            old = read_header(self.root)
            if self._plan(old) != self._plan(self.header):
                diff = [k for k in self._plan(old) if self._plan(old)[k] != self._plan(self.header)[k]]
                raise ValueError(f"{self.root} already holds a teacher store of another plan "
                                 f"(differs in {diff}); write to a new --out folder or delete it")
            self.header["valid_losses"] = old.get("valid_losses")
        os.makedirs(self.root, exist_ok=True)
        for name, ids in self.covered.items():
            os.makedirs(os.path.join(self.root, name), exist_ok=True)
            tmp = os.path.join(self.root, name, "covered.npy.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(ids, dtype=np.int64))
            os.replace(tmp, os.path.join(self.root, name, "covered.npy"))
        self.header["complete"] = False
        _write_json(path, self.header)
        return resumed

    def done(self, domain: str, index: int) -> bool:
        """Shard `index` of `domain` is complete (renamed into place)."""
        return os.path.isdir(shard_dir(self.root, domain, index))

    def write_shard(self, domain: str, index: int, arrays: Dict[str, np.ndarray]) -> None:
        """Write one shard into <shard>.tmp, then rename it into place (atomic)."""
        final = shard_dir(self.root, domain, index)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for key in ARRAYS:
            arr = np.ascontiguousarray(arrays[key], dtype=self.dtypes[key])
            with open(os.path.join(tmp, key + ".npy"), "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)

    def finish(self, valid_losses: Dict[str, float]) -> None:
        """Record the teacher's validation losses and mark the store complete."""
        missing = [(d, j) for d, info in self.header["domains"].items()
                   for j in range(info["num_shards"]) if not self.done(d, j)]
        if missing:
            raise RuntimeError(f"{self.root}: shards {missing[:5]} are missing; not marking the "
                               f"store complete")
        self.header["valid_losses"] = {k: float(v) for k, v in valid_losses.items()}
        self.header["complete"] = True
        _write_json(os.path.join(self.root, HEADER_FILE), self.header)


class TeacherStore:
    """Reads a complete store: memory-mapped shards, an index from sample id to (shard, row).

    Args:
        root: the store folder.
        domains: the run's domain names (manifest order): domain id i of a batch is domains[i].
    """

    def __init__(self, root: str, domains: Sequence[str]):
        self.root = root
        self.header = read_header(root)
        if not self.header.get("complete"):
            raise ValueError(f"teacher store {root} is incomplete (an interrupted "
                             f"tools/cache_teacher_logits.py run?); rerun it with the same "
                             f"arguments to finish it")
        self.identity = self.header["identity"]
        self.top_k = int(self.header["top_k"])
        self.temperature = float(self.identity["temperature"])
        self.names = list(domains)
        self.samples_served = 0
        sizes = dict(zip(self.identity["domains"], self.identity["num_train_samples"]))
        self._shards: List[List[Dict[str, np.ndarray]]] = []
        self._where: List[np.ndarray] = []
        for name in self.names:  # a domain the store does not hold covers nothing
            where = np.full(int(sizes.get(name, 0)), -1, dtype=np.int64)
            shards = []
            info = self.header["domains"].get(name, {"num_shards": 0})
            for j in range(info["num_shards"]):
                folder = shard_dir(root, name, j)
                arrs = {k: np.load(os.path.join(folder, k + ".npy"), mmap_mode="r")
                        for k in ARRAYS}
                where[np.asarray(arrs["sample_ids"])] = (j << 32) + np.arange(
                    len(arrs["sample_ids"]), dtype=np.int64)
                shards.append(arrs)
            self._shards.append(shards)
            self._where.append(where)

    # --------------------------------------------------------------------------- checks
    def check_identity(self, run: dict) -> None:
        """ValueError naming every identity field where the run differs from the store."""
        errs = identity_errors(self.identity, run, self.root)
        if errs:
            raise ValueError(errs[0])

    def num_covered(self, domain: int) -> int:
        """Samples of run domain `domain` the store holds."""
        return int(self.header["domains"].get(self.names[domain], {}).get("num_covered", 0))

    def _missing_message(self, domain: int, sample: int) -> str:
        name = self.names[domain]
        size = int(self._where[domain].size)
        order = domain_sample_order(int(self.identity["seed"]), domain, size, 0)
        position = int(np.flatnonzero(order == sample)[0]) + 1 if 0 <= sample < size else None
        need = (f"--max-samples-per-domain {position} at least (this sample is number "
                f"{position} of the domain's draw order)" if position else
                "the same data")
        return (f"teacher store {self.root} has no logits for domain {name!r} sample {sample}: "
                f"it covers the first {self.num_covered(domain)} of the {size} samples this "
                f"domain draws in order; rebuild it with tools/cache_teacher_logits.py {need}, "
                f"or with the maximum per domain that tools/simulate_mixture.py reports for the "
                f"whole run (or without --max-samples-per-domain to cover everything)")

    def check_covered(self, entries: Sequence[Tuple[int, int]]) -> None:
        """ValueError for the first (domain, sample) the store does not hold."""
        for d, s in entries:
            if not 0 <= d < len(self.names):
                raise ValueError(f"teacher store {self.root}: domain id {d} is outside the "
                                 f"run's {len(self.names)} domains")
            if not 0 <= s < self._where[d].size or self._where[d][s] < 0:
                raise ValueError(self._missing_message(d, s))

    # --------------------------------------------------------------------------- reads
    def read(self, domain_ids: Sequence[int], sample_ids: Sequence[int],
             tokens: Optional[torch.Tensor] = None):
        """The stored teacher for a micro-batch: (topk_ids [b, s, K] int64, topk_logprobs
        [b, s, K] fp32, rest_logprob [b, s] fp32) as torch tensors on the CPU. With `tokens`
        ([b, s] inputs) each sample's checksum is compared with the stored one."""
        entries = [(int(d), int(s)) for d, s in zip(domain_ids, sample_ids)]
        self.check_covered(entries)
        ids, logp, rest = [], [], []
        for i, (d, s) in enumerate(entries):
            loc = int(self._where[d][s])
            shard, row = self._shards[d][loc >> 32], loc & 0xFFFFFFFF
            if tokens is not None and int(shard["checksums"][row]) != sample_checksum(tokens[i]):
                raise ValueError(f"teacher store {self.root}: domain {self.names[d]!r} sample "
                                 f"{s} holds other tokens than this run's sample (data changed "
                                 f"since the store was built); rebuild the store")
            ids.append(shard["topk_ids"][row])
            logp.append(shard["topk_logprobs"][row])
            rest.append(shard["rest_logprob"][row])
        self.samples_served += len(entries)
        return (torch.from_numpy(np.stack(ids).astype(np.int64)),
                torch.from_numpy(np.stack(logp).astype(np.float32)),
                torch.from_numpy(np.stack(rest).astype(np.float32)))

    def valid_losses(self) -> np.ndarray:
        """The teacher's per-domain mean validation CE, in the run's domain order."""
        losses = self.header.get("valid_losses") or {}
        missing = [n for n in self.names if n not in losses]
        if missing:
            raise ValueError(f"teacher store {self.root} holds no teacher validation loss for "
                             f"domain(s) {missing} (DDK's ppl_T); rebuild it with those domains")
        return np.array([float(losses[n]) for n in self.names], dtype=np.float64)
