"""The offline teacher store: the teacher's top-K log-probabilities keyed by (domain, sample id).

One teacher pass (`megatron-ddk cache-teacher`, training/teacher_cache.py) writes it; any KD or
DDK run whose samples it covers reads it instead of running the teacher, whatever its mixture
weights (design.md, "Teacher signal"). Layout of a store folder DIR:

    DIR/header.json                     identity, format, encoding, coverage, measured sizes,
                                        the teacher's validation losses
    DIR/<domain>/covered.npy            [n] int64: the covered sample ids, in the run's draw order
    DIR/<domain>/shard_000000/          shard j: covered ids [j*S, (j+1)*S), renamed into place
                                        whole (a crash leaves shard_000000.tmp<pid>; a rerun
                                        removes it and redoes the shard)

A shard's files depend on the header's format_version (data/store_shards.py): format 2 (the
default) stores per token an adaptive number of entries (top_p, capped at K), the ids as an
Elias-Fano coded set (or bit-packed) and quantised log-probabilities (data/store_codec.py), one
chunk per sample behind a memory-mapped index; format 1 (fixed K, dense uint16|int32 ids and
float16|float32 log-probabilities) is still read and can still be written. Both read back as
fixed-K tensors, unused entries id -1 / -inf.

Coverage: with --max-samples-per-domain N a domain's store holds the first N sample ids of the
run's epoch-0 draw order (mixture.domain_sample_order): any mixture draws a domain's samples in
that order, so N bounds what a run may draw from it (`megatron-ddk simulate-mixture` reports it).

The identity (teacher checkpoint fingerprint, teacher shape, tokenizer hash, seq_length,
temperature, seed, vocabulary, domains and their sizes, validation set size) is compared with the
run's field by field; each sample's token checksum is compared with the batch the run collates.
A mismatch or an uncovered (domain, sample) is a ValueError that names it: never a silent
fallback. header.json's "complete" turns true only after the last shard and the teacher's
per-domain validation losses (DDK's ppl_T) are written.

Imports numpy, torch and data.mixture / store_codec / store_shards only; must not import
models, losses or training.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ddk.atomic import write_atomic
from megatron_ddk.data import store_codec, store_shards
from megatron_ddk.data.mixture import IntervalMixture, domain_sample_order
from megatron_ddk.data.store_codec import StoreEncoding

FORMAT_VERSION = 2
"""What the writer writes by default; READ_VERSIONS are read."""
READ_VERSIONS = (1, 2)
HEADER_FILE = "header.json"
ARRAYS = store_shards.V1_ARRAYS
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
    """Format-1 bytes per token: K ids + K log-probabilities + the rest's log-mass (fp32)."""
    return top_k * (id_dtype(vocab_size).itemsize + np.dtype(logprob_dtype).itemsize) + 4


def max_samples_per_domain(sizes: Sequence[int], global_batch_size: int, interval: int,
                           steps: int, policy: str, weights: Optional[Sequence[float]] = None,
                           alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """The most samples of each domain a run can draw: what --max-samples-per-domain must cover.

    static / equal (fixed weights, `weights` for static): exact, by running the interval mixture.
    ddk / ddk_no_smoothing: interval 0 draws with `weights` (its initial sampling), exactly;
    every later interval at most ceil(w_max x interval x global_batch_size) per domain, with
    w_max = alpha + (1 - alpha) / N under Eq. 2's smoothing and 1 without it (any weights the
    run may choose); `weights` None (an initial sampling not known before the run, eq1):
    interval 0 is bounded like the others. Capped at the domain's size: a second epoch
    re-draws the same ids.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = sizes.size
    adaptive = policy not in ("static", "equal")
    if adaptive and weights is None:
        bound = _bound_any(n, global_batch_size, interval, steps, policy, alpha, first=0)
        return np.minimum(bound, sizes).astype(np.int64)
    fixed = np.full(n, 1.0 / n) if policy == "equal" or weights is None else np.asarray(weights)
    mix = IntervalMixture(sizes, global_batch_size, interval, seed)
    first = steps if policy in ("static", "equal") else min(steps, interval)
    for t in range(-(-first // interval)):
        k = min(interval, first - t * interval)
        mix.start_interval(fixed, num_steps=k)
        mix.advance(k)
    need = mix.samples_consumed.astype(np.int64)
    if adaptive:
        need = need + _bound_any(n, global_batch_size, interval, steps, policy, alpha, first=1)
    return np.minimum(need, sizes).astype(np.int64)


def _bound_any(n: int, global_batch_size: int, interval: int, steps: int, policy: str,
               alpha: float, first: int) -> np.ndarray:
    """[n] most samples per domain that intervals `first`.. of a DDK run may draw, whatever
    its weights (interval 0, the initial sampling, is not smoothed: w_max = 1 there)."""
    w_max = min(1.0, alpha + (1.0 - alpha) / n) if policy == "ddk" else 1.0
    need = np.zeros(n, dtype=np.float64)
    for t in range(first, -(-steps // interval)):
        k = min(interval, steps - t * interval)
        need += np.ceil(w_max * k * global_batch_size)
    if first == 0 and policy == "ddk":  # interval 0 is the unsmoothed initial sampling
        k = min(interval, steps)
        need += np.ceil(k * global_batch_size) - np.ceil(w_max * k * global_batch_size)
    return need.astype(np.int64)


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
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def read_header(root: str) -> dict:
    """The store's header.json; a ValueError naming the folder when there is none."""
    path = os.path.join(root, HEADER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{root} is not a teacher store (no {HEADER_FILE}); build one with "
                         f"tools/cache_teacher_logits.py --config RUN.yaml --out {root}")
    with open(path) as f:
        header = json.load(f)
    if header.get("format_version") not in READ_VERSIONS:
        raise ValueError(f"{path}: format_version {header.get('format_version')} is not one of "
                         f"{list(READ_VERSIONS)} this release reads; rebuild the store with it")
    if header["format_version"] == 2:
        enc = StoreEncoding.from_dict(header.get("encoding") or {"vocab_size": 0})
        if enc.compression == "zstd":
            store_codec.zstd_module()  # a missing package is named before any read
    return header


def identity_errors(stored: dict, run: dict, where: str) -> List[str]:
    """One message per identity field where the store and the run differ (None: not checked)."""
    errs = []
    for key in IDENTITY_FIELDS:
        mine, theirs = run.get(key), stored.get(key)
        if mine is None or theirs is None or mine == theirs:
            continue
        if isinstance(mine, dict):  # only the entries that differ
            keys = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
            mine, theirs = ({k: d.get(k) for k in keys} for d in (mine, theirs))
        errs.append(f"{key}: store {theirs!r} vs run {mine!r} ({_HINTS[key]})")
    return [f"teacher store {where} does not match this run: " + "; ".join(errs)] if errs else []


def shard_dir(root: str, domain: str, index: int) -> str:
    return os.path.join(root, domain, f"shard_{index:06d}")


class StoreWriter:
    """Writes a store: the header first (complete: false), shards atomically, then finish().

    `encoding` given: format 2 (data/store_codec.py); None: format 1 with `logprob_dtype`.
    A folder that already holds a header of the same plan (identity, format, encoding,
    coverage) is resumed: shards already renamed into place are kept. Another plan is refused.
    """

    def __init__(self, root: str, identity: dict, top_k: int, logprob_dtype: str,
                 shard_samples: int, covered: Dict[str, np.ndarray], extra: Optional[dict] = None,
                 encoding: Optional[StoreEncoding] = None):
        self.root, self.encoding, self.covered = root, encoding, covered
        vocab = int(identity["vocab_size"])
        self.header = {
            "complete": False, "identity": identity, "top_k": int(top_k),
            "shard_samples": int(shard_samples),
            "domains": {name: {"num_covered": int(len(ids)),
                               "num_shards": -(-len(ids) // shard_samples),
                               "covered_sha256": hashlib.sha256(
                                   np.asarray(ids, np.int64).tobytes()).hexdigest()}
                        for name, ids in covered.items()},
            "valid_losses": None, **(extra or {})}
        if encoding is None:
            if logprob_dtype not in ("float16", "float32"):
                raise ValueError(f"logprob dtype {logprob_dtype!r}: use float16 or float32")
            self.dtypes = {"sample_ids": "int64", "checksums": "uint32",
                           "topk_ids": id_dtype(vocab).name, "topk_logprobs": logprob_dtype,
                           "rest_logprob": "float32"}
            self.header.update(format_version=1, dtypes=self.dtypes,
                               bytes_per_token=bytes_per_token(top_k, vocab, logprob_dtype))
        else:
            errs = encoding.errors()
            if errs:
                raise ValueError("teacher store encoding: " + "; ".join(errs))
            if encoding.compression == "zstd":
                store_codec.zstd_module()
            self.header.update(format_version=2, encoding=encoding.to_dict())

    _PLAN = ("format_version", "identity", "top_k", "dtypes", "encoding", "shard_samples",
             "domains")

    def _plan(self, header: dict) -> dict:
        plan = {k: header.get(k) for k in self._PLAN}
        if plan["encoding"]:  # a header written before id_codec existed reads as packed
            plan["encoding"] = StoreEncoding.from_dict(plan["encoding"]).to_dict()
        return plan

    def begin(self) -> bool:
        """Write (or check) the header and covered ids; True when an earlier run is resumed."""
        path = os.path.join(self.root, HEADER_FILE)
        resumed = os.path.isfile(path)
        if resumed:
            old = read_header(self.root)
            if self._plan(old) != self._plan(self.header):
                mine, theirs = self._plan(old), self._plan(self.header)
                diff = [k for k in self._PLAN if mine[k] != theirs[k]]
                raise ValueError(f"{self.root} already holds a teacher store of another plan "
                                 f"(differs in {diff}); write to a new --out folder or delete it")
            self.header["valid_losses"] = old.get("valid_losses")
        os.makedirs(self.root, exist_ok=True)
        for name, ids in self.covered.items():
            os.makedirs(os.path.join(self.root, name), exist_ok=True)
            write_atomic(os.path.join(self.root, name, "covered.npy"),
                         _npy_bytes(np.asarray(ids, dtype=np.int64)))
        self.header["complete"] = False
        _write_json(path, self.header)
        return resumed

    def done(self, domain: str, index: int) -> bool:
        """Shard `index` of `domain` is complete (renamed into place)."""
        return os.path.isdir(shard_dir(self.root, domain, index))

    def write_shard(self, domain: str, index: int, arrays: Dict[str, np.ndarray]) -> None:
        """Write one shard from [m, s, K] top-K arrays into <shard>.tmp<pid>, renamed into
        place."""
        final = shard_dir(self.root, domain, index)
        if self.encoding is None:
            store_shards.write_v1(final, arrays, self.dtypes)
        else:
            store_shards.write_v2(final, arrays, self.encoding)

    def _measure(self) -> dict:
        """Bytes (all shard files) and entries per token of the finished shards."""
        seq = int(self.header["identity"]["seq_length"])
        total_bytes = total_entries = tokens = 0
        for name, info in self.header["domains"].items():
            for j in range(info["num_shards"]):
                folder = shard_dir(self.root, name, j)
                total_bytes += store_shards.shard_bytes(folder)
                if self.encoding is not None:
                    total_entries += int(np.load(os.path.join(folder, "entries.npy")).sum())
            tokens += info["num_covered"] * seq
        tokens = max(tokens, 1)
        out = {"measured_bytes_per_token": total_bytes / tokens}
        if self.encoding is not None:
            out["entries_per_token"] = total_entries / tokens
            out["bytes_per_token"] = total_bytes / tokens
        return out

    def finish(self, valid_losses: Dict[str, float]) -> None:
        """Record the teacher's validation losses and sizes; mark the store complete."""
        missing = [(d, j) for d, info in self.header["domains"].items()
                   for j in range(info["num_shards"]) if not self.done(d, j)]
        if missing:
            raise RuntimeError(f"{self.root}: shards {missing[:5]} are missing; not marking the "
                               f"store complete")
        self.header.update(self._measure())
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
        self._shards: List[list] = []
        self._where: List[np.ndarray] = []
        for name in self.names:  # a domain the store does not hold covers nothing
            where = np.full(int(sizes.get(name, 0)), -1, dtype=np.int64)
            shards = []
            info = self.header["domains"].get(name, {"num_shards": 0})
            for j in range(info["num_shards"]):
                shard = store_shards.open_shard(shard_dir(root, name, j), self.header)
                where[np.asarray(shard.sample_ids)] = (j << 32) + np.arange(
                    len(shard.sample_ids), dtype=np.int64)
                shards.append(shard)
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
        [b, s, K] fp32, rest_logprob [b, s] fp32) as torch tensors on the CPU; a format-2 token
        with fewer than K entries is padded with id -1 and log-probability -inf (no entry). With
        `tokens` ([b, s] inputs) each sample's checksum is compared with the stored one."""
        entries = [(int(d), int(s)) for d, s in zip(domain_ids, sample_ids)]
        self.check_covered(entries)
        ids, logp, rest = [], [], []
        for i, (d, s) in enumerate(entries):
            loc = int(self._where[d][s])
            shard, row = self._shards[d][loc >> 32], loc & 0xFFFFFFFF
            if tokens is not None and int(shard.checksums[row]) != sample_checksum(tokens[i]):
                raise ValueError(f"teacher store {self.root}: domain {self.names[d]!r} sample "
                                 f"{s} holds other tokens than this run's sample (data changed "
                                 f"since the store was built); rebuild the store")
            a, b, c = shard.row(row)
            ids.append(a)
            logp.append(b)
            rest.append(c)
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
