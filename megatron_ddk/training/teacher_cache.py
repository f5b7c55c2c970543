"""The offline teacher's producer: run the teacher once over each domain's training samples and
write its top-K log-probabilities to a store (data/teacher_store.py) keyed by (domain, sample id).

    megatron-ddk cache-teacher --config RUN.yaml --out DIR [--top-k K] [--top-p P]
        [--logprob-codec q4] [--id-codec ef|packed] [--tail-samples M] [--compression none|zstd]
        [--domains ...]
        [--max-samples-per-domain N | --cover-runs RUN.yaml ...]

The teacher is the same Megatron-Core model online KD builds (build_teacher: frozen, eval mode),
on the run's TP / PP layout with data parallelism over the remaining ranks. Shards are dealt
round-robin to data-parallel replicas; inside a replica the forward passes go through Megatron-
Core's schedules (forward only), the last stage's tensor-parallel ranks compute the top-K on
their vocabulary shards (losses/topk_kl.vocab_parallel_topk, no gather of the vocabulary) and
its TP rank 0 writes the shard (encoded there for format 2: data/store_codec.py's adaptive
coverage, Elias-Fano coded ids (data/store_ids.py), quantised log-probabilities; with
--tail-samples M, M ids drawn from the teacher's mass outside the top K, losses/tail_sample.py,
from uniforms seeded by (train.seed, domain, sample): tail_uniforms). An interrupted
run resumes: shards already renamed into place are skipped. Last, the teacher's per-domain
validation losses (DDK's ppl_T) are measured exactly as the trainer would (training/evaluate.py)
and the header is marked complete.

The run identity a store is checked against (run_identity) and the opening of a store for a
training run are in training/teacher_source.py.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.config import RunConfig, load_config
from megatron_ddk.data.mixture import collate, domain_sample_order
from megatron_ddk.data.store_codec import (  # noqa: F401 (the producer's defaults)
    DEFAULT_COMPRESSION,
    DEFAULT_ID_CODEC,
    DEFAULT_LOGPROB_CODEC,
    DEFAULT_STORE_FORMAT,
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    StoreEncoding,
)
from megatron_ddk.data.store_codec import bytes_per_token as encoded_bytes_per_token
from megatron_ddk.data.teacher_store import (
    StoreWriter,
    bytes_per_token,
    max_samples_per_domain,
    sample_checksum,
)
from megatron_ddk.losses.tail_sample import vocab_parallel_tail_sample
from megatron_ddk.losses.topk_kl import vocab_parallel_topk
from megatron_ddk.models.checkpoint import describe_checkpoint
from megatron_ddk.models.pair import DistillationPair
from megatron_ddk.models.teacher import build_teacher
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training import builder
from megatron_ddk.training.evaluate import evaluate_domains
from megatron_ddk.training.schedule import run_batches
from megatron_ddk.training.teacher_source import run_identity

logger = logging.getLogger(__name__)

SHARD_BYTES = 64 << 20
"""Default shard size: about this many bytes of store per shard (whole samples, a multiple of
the micro-batch size)."""

TAIL_STREAM = 0x7A11
"""Seeds the tail draws' uniforms apart from every other use of train.seed."""


def plan_coverage(seed: int, names: Sequence[str], sizes: Sequence[int],
                  domains: Optional[Sequence[str]], max_samples
                  ) -> Dict[str, np.ndarray]:
    """Per chosen domain, the sample ids to cache: the first N of the run's draw order (all of
    them when N is None or at least the domain's size); N is one int or a per-domain list."""
    chosen = list(names) if not domains else list(domains)
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise ValueError(f"--domains {unknown}: not in the manifest's domains {list(names)}")
    per = None if max_samples is None else (
        [int(max_samples)] * len(names) if np.isscalar(max_samples) else
        [int(x) for x in max_samples])
    if per is not None and min(per) < 1:
        raise ValueError(f"--max-samples-per-domain={max_samples}: must be >= 1")
    out = {}
    for i, name in enumerate(names):
        if name in chosen:
            order = domain_sample_order(seed, i, int(sizes[i]), 0)
            out[name] = order if per is None else order[:per[i]]
    return out


def coverage_of_runs(cfg: RunConfig, run_configs: Sequence[str], data: "builder.DataParts"
                     ) -> List[int]:
    """Per domain, the most samples any of `run_configs` can draw (max_samples_per_domain over
    each run's policy, steps, interval, batch and initial weights): what a store shared by those
    runs must cover. Each run must have this store's seed (the draw order)."""
    sizes = [int(n) for n in data.datasets.num_train_samples]
    natural = data.manifest.natural_weights()
    need = np.zeros(len(sizes), dtype=np.int64)
    for path in run_configs:
        run = load_config(path, [])
        if run.train.seed != cfg.train.seed:
            raise ValueError(f"--cover-runs {path}: train.seed {run.train.seed} differs from the "
                             f"store's {cfg.train.seed} (the seed fixes the draw order a store "
                             f"covers); build one store per seed")
        k = run.ddk
        if k.policy == "static":
            weights = natural if k.static_weights is None else np.asarray(k.static_weights)
        elif k.initial_sampling in ("natural", "uniform"):
            weights = natural if k.initial_sampling == "natural" else np.full(len(sizes),
                                                                              1 / len(sizes))
        else:
            weights = None  # eq1 / manifest: bounded like any later interval
        bound = max_samples_per_domain(sizes, run.train.global_batch_size, k.interval,
                                       run.train.train_iters, k.policy, weights=weights,
                                       alpha=k.alpha, seed=run.train.seed)
        need = np.maximum(need, bound)
    return [max(1, int(x)) for x in need]


def _default_shard_samples(seq_length: int, bpt: float, mbs: int) -> int:
    per_sample = max(1, int(seq_length * bpt))
    return max(mbs, (SHARD_BYTES // per_sample) // mbs * mbs)


def _todo(writer: StoreWriter, covered: Dict[str, np.ndarray], shard_samples: int) -> List:
    """(domain, shard index) not yet written, decided on rank 0 and shared with every rank."""
    todo = [(name, j) for name, ids in covered.items()
            for j in range(-(-len(ids) // shard_samples)) if not writer.done(name, j)]
    box = [todo]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def tail_uniforms(seed: int, domain: int, sample: int, seq_length: int) -> np.ndarray:
    """[seq_length] the u of each token's tail draws (losses/tail_sample.py): a function of
    (train.seed, domain, sample) only, so a store is the same whatever the layout or shard."""
    return np.random.default_rng([int(seed), TAIL_STREAM, int(domain), int(sample)]).random(
        int(seq_length))


def _shard_arrays(teacher, ctx: ParallelContext, entries, datasets, cfg: RunConfig, top_k: int,
                  vocab_size: int, tail_samples: int = 0) -> Optional[Dict[str, np.ndarray]]:
    """Run the teacher over one shard's samples; the writing rank gets its arrays, others None."""
    mbs = cfg.train.micro_batch_size
    num_mb = -(-len(entries) // mbs)
    padded = list(entries) + [entries[-1]] * (num_mb * mbs - len(entries))
    batches = [collate(padded[i * mbs:(i + 1) * mbs], datasets) for i in range(num_mb)]
    rows: Dict[str, list] = {"topk_ids": [], "topk_logprobs": [], "rest_logprob": []}
    if tail_samples:
        rows["tail_ids"] = []
        for i, batch in enumerate(batches):
            batch["tail_uniforms"] = torch.from_numpy(np.stack([
                tail_uniforms(cfg.train.seed, d, smp, cfg.data.seq_length)
                for d, smp in padded[i * mbs:(i + 1) * mbs]]))

    def loss_of(batch):
        def loss_func(logits):
            ids, logp, rest = vocab_parallel_topk(
                logits, top_k, tp_group=ctx.tp_group, temperature=cfg.distill.temperature,
                vocab_size=vocab_size, chunk_tokens=cfg.distill.kl_chunk_tokens)
            rows["topk_ids"].append(ids.cpu().numpy())
            rows["topk_logprobs"].append(logp.cpu().numpy())
            rows["rest_logprob"].append(rest.cpu().numpy())
            if tail_samples:
                tail = vocab_parallel_tail_sample(
                    logits, ids, batch["tail_uniforms"].to(logits.device), tail_samples,
                    tp_group=ctx.tp_group, temperature=cfg.distill.temperature,
                    vocab_size=vocab_size, chunk_tokens=cfg.distill.kl_chunk_tokens)
                rows["tail_ids"].append(tail.cpu().numpy())
            return torch.zeros((), device=logits.device), {}

        return loss_func

    with torch.no_grad():
        run_batches(ctx, teacher, batches, loss_of, cfg.data.seq_length, mbs, forward_only=True)
    if not (ctx.is_last_stage and ctx.tp_rank == 0):
        return None
    n = len(entries)
    arrays = {k: np.concatenate(v)[:n] for k, v in rows.items()}
    arrays["sample_ids"] = np.array([s for _, s in entries], dtype=np.int64)
    tokens = torch.cat([b["tokens"] for b in batches])[:n]
    arrays["checksums"] = np.array([sample_checksum(t) for t in tokens], dtype=np.uint32)
    return arrays


def cache_teacher_logits(cfg: RunConfig, ctx: ParallelContext, out: str, *,
                         top_k: int = DEFAULT_TOP_K, domains: Optional[Sequence[str]] = None,
                         max_samples_per_domain: Optional[int] = None,
                         logprob_dtype: Optional[str] = None,
                         shard_samples: Optional[int] = None,
                         top_p: float = DEFAULT_TOP_P,
                         logprob_codec: str = DEFAULT_LOGPROB_CODEC,
                         compression: str = DEFAULT_COMPRESSION,
                         id_codec: str = DEFAULT_ID_CODEC,
                         store_format: Optional[int] = None,
                         cover_runs: Optional[Sequence[str]] = None,
                         tail_samples: Optional[int] = None) -> dict:
    """Build (or finish) the store at `out` for the run `cfg` (all ranks call it).

    Format 2 (default) with top_p / logprob_codec / compression / id_codec / tail_samples
    (data/store_codec.py, data/store_ids.py, data/store_tail.py); format 1
    (fixed K, `logprob_dtype` float16 | float32) when store_format is 1 or logprob_dtype is
    given (the flag of format 1). cover_runs: run configs whose draws the store must cover
    (coverage_of_runs), instead of max_samples_per_domain.

    Returns a summary: samples and tokens cached per domain, bytes per token, seconds.
    """
    if cfg.distill.teacher is None or isinstance(cfg.distill.teacher, str) \
            or not cfg.distill.teacher_load:
        raise ValueError("the run config has no teacher: set distill.teacher and "
                         "distill.teacher_load (the teacher whose logits are cached)")
    if shard_samples is not None and shard_samples < 1:
        raise ValueError(f"--shard-samples {shard_samples}: must be >= 1")
    started = time.time()
    data = builder.build_data(cfg, ctx, cfg.ddk.valid_samples_per_domain)
    if not 1 <= top_k <= data.vocab_size:
        raise ValueError(f"--top-k {top_k}: must be in [1, {data.vocab_size}] (the vocabulary)")
    names, sizes = data.manifest.names(), data.datasets.num_train_samples
    if cover_runs and max_samples_per_domain is not None:
        raise ValueError("give --max-samples-per-domain or --cover-runs, not both")
    limit = coverage_of_runs(cfg, cover_runs, data) if cover_runs else max_samples_per_domain
    covered = plan_coverage(cfg.train.seed, names, sizes, domains, limit)
    encoding, bpt = _encoding(store_format, logprob_dtype, data.vocab_size, top_k, top_p,
                              logprob_codec, compression, id_codec, tail_samples)
    tail_samples = encoding.tail_samples if encoding is not None else 0
    padded_vocab = builder.model_vocab(cfg, data.vocab_size, ctx.tp_size)
    teacher_ckpt = describe_checkpoint(cfg.distill.teacher_load)  # read once, used twice
    teacher = build_teacher(cfg.distill.teacher, ctx, padded_vocab, teacher_ckpt,
                            bf16=builder.use_bf16(cfg), tokenizer_hash=data.tokenizer_hash)
    mbs = cfg.train.micro_batch_size
    shard_samples = shard_samples or _default_shard_samples(cfg.data.seq_length, bpt, mbs)
    writer = StoreWriter(out, run_identity(cfg, data, teacher_ckpt), top_k,
                         logprob_dtype or "float16", shard_samples, covered,
                         extra={"teacher_load": cfg.distill.teacher_load}, encoding=encoding)
    resumed = writer.begin() if ctx.rank == 0 else False
    if dist.is_initialized():
        dist.barrier()
    todo = _todo(writer, covered, shard_samples)
    total_shards = sum(-(-len(v) // shard_samples) for v in covered.values())
    logger.info("teacher store %s: format %d, %d domain(s), K=%d, %d tail samples, <= %.1f "
                "bytes/token, %d of %d shards to write%s", out, writer.header["format_version"],
                len(covered), top_k, tail_samples, bpt, len(todo), total_shards,
                " (resuming)" if resumed else "")
    mine = todo[ctx.dp_rank::ctx.dp_size]
    index = {n: i for i, n in enumerate(names)}
    t0, done_tokens = time.time(), 0
    for step, (name, j) in enumerate(mine):
        ids = covered[name][j * shard_samples:(j + 1) * shard_samples]
        entries = [(index[name], int(s)) for s in ids]
        arrays = _shard_arrays(teacher, ctx, entries, data.datasets.train, cfg, top_k,
                               data.vocab_size, tail_samples)
        if arrays is not None:
            writer.write_shard(name, j, arrays)
        done_tokens += len(entries) * cfg.data.seq_length
        rate = done_tokens / max(time.time() - t0, 1e-9)
        left = sum(len(covered[n][k * shard_samples:(k + 1) * shard_samples])
                   for n, k in mine[step + 1:]) * cfg.data.seq_length
        logger.info("teacher store: %s shard %d done (%d/%d of this replica's shards), "
                    "%.0f tokens/s, eta %.0f s", name, j, step + 1, len(mine), rate, left / rate)
    if dist.is_initialized():
        dist.barrier()
    valid = evaluate_domains(
        DistillationPair(teacher, None), ctx, data.datasets.valid, micro_batch_size=mbs,
        seq_length=cfg.data.seq_length, vocab_size=data.vocab_size, with_teacher=False,
        chunk_tokens=cfg.distill.kl_chunk_tokens).student
    if ctx.rank == 0:
        writer.finish(dict(zip(names, (float(x) for x in valid))))
        bpt = writer.header.get("measured_bytes_per_token", bpt)
    if dist.is_initialized():
        dist.barrier()
    summary = {"out": out, "top_k": top_k, "bytes_per_token": bpt,
               "format_version": writer.header["format_version"],
               "id_codec": encoding.id_codec if encoding is not None else None,
               "tail_samples": tail_samples,
               "entries_per_token": writer.header.get("entries_per_token"),
               "shards_written": len(todo), "seconds": time.time() - started,
               "samples": {n: int(len(v)) for n, v in covered.items()},
               "teacher_valid_loss": {n: float(x) for n, x in zip(names, valid)},
               "teacher_valid_ppl": {n: float(math.exp(x)) for n, x in zip(names, valid)}}
    logger.info("teacher store %s complete: %d samples, %.1f MiB, %.1f s", out,
                sum(summary["samples"].values()),
                sum(summary["samples"].values()) * cfg.data.seq_length * bpt / 2 ** 20,
                summary["seconds"])
    return summary


def default_tail_samples(store_format: int, top_k: int, top_p: float, vocab_size: int) -> int:
    """DEFAULT_TAIL_SAMPLES where tail samples apply: format 2, top_p 1 (adaptive coverage moves
    mass into the rest the draws would not cover) and a top K short of the vocabulary (else
    there is no tail); 0 otherwise."""
    applies = store_format == 2 and float(top_p) >= 1.0 and int(top_k) < int(vocab_size)
    return DEFAULT_TAIL_SAMPLES if applies else 0


def _encoding(store_format: Optional[int], logprob_dtype: Optional[str], vocab_size: int,
              top_k: int, top_p: float, logprob_codec: str, compression: str,
              id_codec: str = DEFAULT_ID_CODEC, tail_samples: Optional[int] = None):
    """(StoreEncoding or None for format 1, bytes per token at most) of the producer's flags
    (format 2 with ef: the most whatever the ids, store_ids.ef_bits_bound). tail_samples None:
    default_tail_samples."""
    fmt = store_format or (1 if logprob_dtype else DEFAULT_STORE_FORMAT)
    if fmt not in (1, 2):
        raise ValueError(f"--store-format {fmt}: use 1 or 2")
    if tail_samples is None:
        tail_samples = default_tail_samples(fmt, top_k, top_p, vocab_size)
    if fmt == 1:
        if logprob_dtype not in (None, "float16", "float32"):
            raise ValueError(f"--logprob-dtype {logprob_dtype!r}: use float16 or float32")
        if tail_samples:
            raise ValueError(f"--tail-samples {tail_samples}: format 1 stores no tail samples; "
                             f"use --store-format 2 or --tail-samples 0")
        return None, bytes_per_token(top_k, vocab_size, logprob_dtype or "float16")
    if logprob_dtype:
        raise ValueError("--logprob-dtype is format 1's flag; with --store-format 2 give "
                         "--logprob-codec float32 | float16 | q8 ...")
    enc = StoreEncoding(vocab_size=vocab_size, top_k=top_k, top_p=float(top_p),
                        logprob_codec=logprob_codec, compression=compression,
                        id_codec=id_codec, tail_samples=int(tail_samples))
    errs = enc.errors()
    if errs:
        raise ValueError("cache-teacher: " + "; ".join(f"--{e.replace('_', '-', 1)}"
                                                        for e in errs))
    return enc, encoded_bytes_per_token(top_k, vocab_size, logprob_codec, top_k, float(top_p),
                                        id_codec, enc.tail_samples)


def format_summary(summary: dict) -> str:
    """The per-domain table the tool prints at the end."""
    entries = summary.get("entries_per_token")
    id_codec = summary.get("id_codec")
    lines = [f"teacher store {summary['out']}: format {summary.get('format_version', 1)}, "
             + (f"{id_codec} ids, " if id_codec else "")
             + f"K={summary['top_k']}"
             + (f" + {summary['tail_samples']} tail samples" if summary.get("tail_samples")
                else "")
             + f", {summary['bytes_per_token']:.1f} bytes/token"
             + (f", {entries:.2f} entries/token" if entries else "")
             + f", {summary['seconds']:.1f} s",
             f"{'domain':<24} {'samples':>9} {'teacher valid ppl':>18}"]
    for name, ppl in summary["teacher_valid_ppl"].items():
        lines.append(f"{name:<24} {summary['samples'].get(name, 0):>9d} {ppl:>18.3f}")
    return "\n".join(lines)
