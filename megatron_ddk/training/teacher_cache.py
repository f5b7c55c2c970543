"""The offline teacher's producer: run the teacher once over each domain's training samples and
write its top-K log-probabilities to a store (data/teacher_store.py) keyed by (domain, sample id).

    tools/cache_teacher_logits.py --config RUN.yaml --out DIR [--top-k K] [--domains ...]
        [--max-samples-per-domain N]

The teacher is the same Megatron-Core model online KD builds (build_teacher: frozen, eval mode),
on the run's TP / PP layout with data parallelism over the remaining ranks. Shards are dealt
round-robin to data-parallel replicas; inside a replica the forward passes go through Megatron-
Core's schedules (forward only), the last stage's tensor-parallel ranks compute the top-K on
their vocabulary shards (losses/topk_kl.vocab_parallel_topk, no gather of the vocabulary) and
its TP rank 0 writes the shard. An interrupted run resumes: shards already renamed into place
are skipped. Last, the teacher's per-domain validation losses (DDK's ppl_T) are measured exactly
as the trainer would (training/evaluate.py) and the header is marked complete.

Also here: the run identity a store is checked against (run_identity), and opening a store for
a training run with every check (open_run_store).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.config import RunConfig, to_dict
from megatron_ddk.data.mixture import collate, domain_sample_order
from megatron_ddk.data.teacher_store import (
    StoreWriter,
    TeacherStore,
    bytes_per_token,
    checkpoint_fingerprint,
    sample_checksum,
)
from megatron_ddk.losses.topk_kl import vocab_parallel_topk
from megatron_ddk.models.checkpoint import resolve_checkpoint
from megatron_ddk.models.pair import DistillationPair
from megatron_ddk.models.teacher import build_teacher
from megatron_ddk.parallel.state import ParallelContext
from megatron_ddk.training import builder
from megatron_ddk.training.evaluate import evaluate_domains
from megatron_ddk.training.schedule import forward_backward

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 32
"""Default K: in bench/offline_teacher.py's table (docs/offline_teacher.md) offline KD ended
+0.95% / +0.52% / +0.19% from online KD's test perplexity at K = 8 / 32 / 128; 32 is the smallest
K within 1% with margin."""

SHARD_BYTES = 64 << 20
"""Default shard size: about this many bytes of store per shard (whole samples, a multiple of
the micro-batch size)."""


def run_identity(cfg: RunConfig, data: "builder.DataParts") -> dict:
    """What a store must have been computed from to serve this run (teacher_store.IDENTITY_FIELDS).

    The teacher's checkpoint fingerprint and shape are included when the run names them
    (distill.teacher_load / distill.teacher); None fields are not compared."""
    teacher = cfg.distill.teacher
    fingerprint = None
    if cfg.distill.teacher_load:
        fingerprint = checkpoint_fingerprint(resolve_checkpoint(cfg.distill.teacher_load)[0])
    return {
        "teacher_fingerprint": fingerprint,
        "teacher_model": to_dict(teacher) if teacher is not None and not isinstance(teacher, str)
        else None,
        "tokenizer_hash": data.tokenizer_hash, "seq_length": int(cfg.data.seq_length),
        "temperature": float(cfg.distill.temperature), "seed": int(cfg.train.seed),
        "vocab_size": int(data.vocab_size), "domains": data.manifest.names(),
        "num_train_samples": [int(n) for n in data.datasets.num_train_samples],
        "valid_samples_per_domain": int(cfg.ddk.valid_samples_per_domain),
    }


def open_run_store(cfg: RunConfig, data: "builder.DataParts") -> Optional[TeacherStore]:
    """The store named by distill.teacher_logits, checked against this run (None without one)."""
    root = getattr(cfg.distill, "teacher_logits", None)
    if not root:
        return None
    if cfg.distill.kl_direction != "forward":
        raise ValueError(f"distill.kl_direction={cfg.distill.kl_direction!r} with "
                         f"distill.teacher_logits={root}: reverse KL weighs the log-ratio by the "
                         f"student over the whole vocabulary, which a top-K store cannot give; "
                         f"use kl_direction: forward, or the online teacher (teacher_logits: null)")
    if getattr(cfg.ddk, "signal", "validation") != "validation":
        raise ValueError(f"ddk.signal={cfg.ddk.signal!r} with distill.teacher_logits={root}: the "
                         f"training signal needs the teacher's CE on every training token, which "
                         f"a top-K store does not hold; use ddk.signal: validation (the store "
                         f"holds the teacher's validation losses)")
    store = TeacherStore(root, data.manifest.names())
    store.check_identity(run_identity(cfg, data))
    if cfg.distill.teacher_load is None:
        logger.warning("distill.teacher_load is not set: the store's teacher (%s) is not checked "
                       "against a checkpoint", store.identity.get("teacher_fingerprint"))
    return store


def plan_coverage(seed: int, names: Sequence[str], sizes: Sequence[int],
                  domains: Optional[Sequence[str]], max_samples: Optional[int]
                  ) -> Dict[str, np.ndarray]:
    """Per chosen domain, the sample ids to cache: the first N of the run's draw order (all of
    them when N is None or at least the domain's size)."""
    chosen = list(names) if not domains else list(domains)
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise ValueError(f"--domains {unknown}: not in the manifest's domains {list(names)}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples-per-domain={max_samples}: must be >= 1")
    out = {}
    for i, name in enumerate(names):
        if name in chosen:
            order = domain_sample_order(seed, i, int(sizes[i]), 0)
            out[name] = order if max_samples is None else order[:max_samples]
    return out


def _default_shard_samples(seq_length: int, bpt: int, mbs: int) -> int:
    per_sample = max(1, seq_length * bpt)
    return max(mbs, (SHARD_BYTES // per_sample) // mbs * mbs)


def _todo(writer: StoreWriter, covered: Dict[str, np.ndarray], shard_samples: int) -> List:
    """(domain, shard index) not yet written, decided on rank 0 and shared with every rank."""
    todo = [(name, j) for name, ids in covered.items()
            for j in range(-(-len(ids) // shard_samples)) if not writer.done(name, j)]
    box = [todo]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _shard_arrays(teacher, ctx: ParallelContext, entries, datasets, cfg: RunConfig, top_k: int,
                  vocab_size: int) -> Optional[Dict[str, np.ndarray]]:
    """Run the teacher over one shard's samples; the writing rank gets its arrays, others None."""
    mbs = cfg.train.micro_batch_size
    num_mb = -(-len(entries) // mbs)
    padded = list(entries) + [entries[-1]] * (num_mb * mbs - len(entries))
    batches = [collate(padded[i * mbs:(i + 1) * mbs], datasets) for i in range(num_mb)]
    rows: Dict[str, list] = {"topk_ids": [], "topk_logprobs": [], "rest_logprob": []}
    it = iter(batches)

    def forward_step(_data_iterator, model):
        batch = next(it)
        out = model(batch["tokens"].to(ctx.device), batch["position_ids"].to(ctx.device), None)

        def loss_func(logits):
            ids, logp, rest = vocab_parallel_topk(
                logits, top_k, tp_group=ctx.tp_group, temperature=cfg.distill.temperature,
                vocab_size=vocab_size, chunk_tokens=cfg.distill.kl_chunk_tokens)
            rows["topk_ids"].append(ids.cpu().numpy())
            rows["topk_logprobs"].append(logp.cpu().numpy())
            rows["rest_logprob"].append(rest.cpu().numpy())
            return torch.zeros((), device=logits.device), {}

        return out, loss_func

    with torch.no_grad():
        forward_backward(ctx, [teacher], forward_step, num_mb, cfg.data.seq_length, mbs,
                         forward_only=True)
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
                         logprob_dtype: str = "float16",
                         shard_samples: Optional[int] = None) -> dict:
    """Build (or finish) the store at `out` for the run `cfg` (all ranks call it).

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
    covered = plan_coverage(cfg.train.seed, names, sizes, domains, max_samples_per_domain)
    padded_vocab = builder.model_vocab(cfg, data.vocab_size, ctx.tp_size)
    teacher = build_teacher(cfg.distill.teacher, ctx, padded_vocab, cfg.distill.teacher_load,
                            bf16=builder.use_bf16(cfg), tokenizer_hash=data.tokenizer_hash)
    bpt = bytes_per_token(top_k, data.vocab_size, logprob_dtype)
    mbs = cfg.train.micro_batch_size
    shard_samples = shard_samples or _default_shard_samples(cfg.data.seq_length, bpt, mbs)
    writer = StoreWriter(out, run_identity(cfg, data), top_k, logprob_dtype, shard_samples,
                         covered, extra={"teacher_load": cfg.distill.teacher_load})
    resumed = writer.begin() if ctx.rank == 0 else False
    if dist.is_initialized():
        dist.barrier()
    todo = _todo(writer, covered, shard_samples)
    total_shards = sum(-(-len(v) // shard_samples) for v in covered.values())
    logger.info("teacher store %s: %d domain(s), K=%d, %d bytes/token, %d of %d shards to write%s",
                out, len(covered), top_k, bpt, len(todo), total_shards,
                " (resuming)" if resumed else "")
    mine = todo[ctx.dp_rank::ctx.dp_size]
    index = {n: i for i, n in enumerate(names)}
    t0, done_tokens = time.time(), 0
    for step, (name, j) in enumerate(mine):
        ids = covered[name][j * shard_samples:(j + 1) * shard_samples]
        entries = [(index[name], int(s)) for s in ids]
        arrays = _shard_arrays(teacher, ctx, entries, data.datasets.train, cfg, top_k,
                               data.vocab_size)
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
    if dist.is_initialized():
        dist.barrier()
    summary = {"out": out, "top_k": top_k, "bytes_per_token": bpt,
               "shards_written": len(todo), "seconds": time.time() - started,
               "samples": {n: int(len(v)) for n, v in covered.items()},
               "teacher_valid_loss": {n: float(x) for n, x in zip(names, valid)},
               "teacher_valid_ppl": {n: float(math.exp(x)) for n, x in zip(names, valid)}}
    logger.info("teacher store %s complete: %d samples, %.1f MiB, %.1f s", out,
                sum(summary["samples"].values()),
                sum(summary["samples"].values()) * cfg.data.seq_length * bpt / 2 ** 20,
                summary["seconds"])
    return summary


def format_summary(summary: dict) -> str:
    """The per-domain table the tool prints at the end."""
    lines = [f"teacher store {summary['out']}: K={summary['top_k']}, "
             f"{summary['bytes_per_token']} bytes/token, {summary['seconds']:.1f} s",
             f"{'domain':<24} {'samples':>9} {'teacher valid ppl':>18}"]
    for name, ppl in summary["teacher_valid_ppl"].items():
        lines.append(f"{name:<24} {summary['samples'].get(name, 0):>9d} {ppl:>18.3f}")
    return "\n".join(lines)
