"""Helper of bench/offline_teacher.py: the store's encodings against the dense teacher.

    .venv/bin/python bench/offline_teacher_kl.py --config KD_RUN.yaml --student CKPT \\
        --ks 16,32,64 --top-ps 1,0.99,0.95,0.9 --codecs float16,q8,q4 --id-codecs packed,ef \\
        --out grid.json

Builds the run's teacher and the student checkpoint (one process, TP=1) and runs both over the
first --samples validation samples of every domain (held out from training). Per token it
computes the exact KL(p_T || p_S) (losses/kl.vocab_parallel_kl) and, for every store setting,
the KL the offline teacher gives (losses/topk_kl.vocab_parallel_ce_and_topk_kl) on what that
setting stores:
- format 1 (fixed K, float16 log-probabilities: today's store) for every K;
- format 2 for every K x top_p x codec x id codec (data/store_codec.py: adaptive entries,
  Elias-Fano or bit-packed ids, quantised log-probabilities; encode + decode exactly as the
  store does).
Per setting: the error |KL_store - KL| per token (mean, 99th percentile, in nats), the error of
the mean KL (relative), entries per token, and, for each --compressions, a real store of these
samples (teacher_store.StoreWriter) measured on disk (bytes per token) and read back through
teacher_store.TeacherStore in micro-batches: tokens/s with the page cache dropped for its files
(posix_fadvise DONTNEED: "cold") and again ("warm"). Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def settings(ks, top_ps, codecs, id_codecs=("packed",)):
    """(label, format, K, top_p, codec, id codec) of every setting of the grid (packed rows keep
    the labels of the runs before the ef id codec; ef rows end in " ef")."""
    out = [(f"v1 float16 K={k}", 1, k, 1.0, "float16", "") for k in ks]
    out += [(f"v2 {c} K={k} p={p:g}" + ("" if i == "packed" else f" {i}"), 2, k, p, c, i)
            for k in ks for p in top_ps for c in codecs for i in id_codecs]
    return out


def stored(setting, ids, logp, rest, vocab):
    """What a store of `setting` gives back for [b, s, Kmax] top-K arrays (numpy)."""
    import numpy as np

    from megatron_ddk.data.store_codec import StoreEncoding, decode_sample, encode_sample, fold_rest

    _, fmt, k, top_p, codec, id_codec = setting
    b, s, _ = ids.shape
    if fmt == 1:
        counts = np.full(b * s, k)
        r = fold_rest(logp.reshape(b * s, -1), rest.reshape(-1), counts).reshape(b, s)
        return ids[..., :k], logp[..., :k].astype(np.float16).astype(np.float32), \
            r.astype(np.float32), np.full((b, s), k)
    enc = StoreEncoding(vocab_size=vocab, top_k=k, top_p=top_p, logprob_codec=codec,
                        id_codec=id_codec)
    outs = [decode_sample(encode_sample(ids[i], logp[i], rest[i], enc), s, enc) for i in range(b)]
    i2, l2, r2 = (np.stack(x) for x in zip(*outs))
    return i2, l2, r2, (i2 >= 0).sum(-1)


def drop_cache(root):
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def store_measure(setting, compression, samples, vocab, seq, mbs, work):
    """Write a real store of `samples` [(ids, logp, rest)] and read it back: bytes, tokens/s."""
    import numpy as np

    from megatron_ddk.data.store_codec import StoreEncoding
    from megatron_ddk.data.teacher_store import StoreWriter, TeacherStore

    _, fmt, k, top_p, codec, id_codec = setting
    root = tempfile.mkdtemp(dir=work)
    m = len(samples)
    ident = {"vocab_size": vocab, "seq_length": seq, "domains": ["d"], "num_train_samples": [m],
             "temperature": 1.0, "seed": 0}
    enc = None if fmt == 1 else StoreEncoding(vocab, k, top_p, codec, compression,
                                              id_codec=id_codec)
    w = StoreWriter(root, ident, k, "float16", max(mbs, 1024 // mbs * mbs),
                    {"d": np.arange(m)}, encoding=enc)
    w.begin()
    shard = w.header["shard_samples"]
    for j in range(-(-m // shard)):
        part = samples[j * shard:(j + 1) * shard]
        w.write_shard("d", j, {"sample_ids": np.arange(j * shard, j * shard + len(part)),
                               "checksums": np.zeros(len(part), np.uint32),
                               "topk_ids": np.stack([p[0][..., :k] for p in part]),
                               "topk_logprobs": np.stack([p[1][..., :k] for p in part]),
                               "rest_logprob": np.stack([_fold(p, k) for p in part])})
    w.finish({"d": 0.0})
    out = {"bytes_per_token": w.header["measured_bytes_per_token"]}
    for mode in ("cold", "warm"):
        if mode == "cold":
            drop_cache(root)
        t0 = time.perf_counter()
        store = TeacherStore(root, ["d"])
        for lo in range(0, m, mbs):
            hi = min(m, lo + mbs)
            store.read([0] * (hi - lo), list(range(lo, hi)))
        out[f"read_{mode}_tokens_per_s"] = m * seq / (time.perf_counter() - t0)
    shutil.rmtree(root)
    return out


def _fold(sample, k):
    import numpy as np

    from megatron_ddk.data.store_codec import fold_rest

    ids, logp, rest = sample
    s = logp.shape[0]
    return fold_rest(logp, rest, np.full(s, k)).astype(np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--ks", default="16,32,64")
    p.add_argument("--top-ps", default="1,0.99,0.95,0.9")
    p.add_argument("--codecs", default="float16,q8,q4")
    p.add_argument("--id-codecs", default="packed,ef")
    p.add_argument("--compressions", default="none,zstd")
    p.add_argument("--samples", type=int, default=32, help="validation samples per domain")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    grid = settings(ks, [float(x) for x in args.top_ps.split(",")], args.codecs.split(","),
                    args.id_codecs.split(","))

    import numpy as np
    import torch

    from megatron_ddk.data.mixture import collate
    from megatron_ddk.losses.kl import vocab_parallel_kl
    from megatron_ddk.losses.topk_kl import vocab_parallel_ce_and_topk_kl, vocab_parallel_topk
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model
    from megatron_ddk.models.teacher import build_teacher
    from megatron_ddk.parallel import destroy
    from megatron_ddk.training import builder, entry

    cfg = entry.prepare_config(args.config, [f"logging.run_dir={tempfile.mkdtemp()}",
                                             "distill.teacher_logits=null"])
    ctx = entry.start_parallel(cfg)
    data = builder.build_data(cfg, ctx, cfg.ddk.valid_samples_per_domain)
    padded = builder.model_vocab(cfg, data.vocab_size, ctx.tp_size)
    teacher = build_teacher(cfg.distill.teacher, ctx, padded, cfg.distill.teacher_load)
    student = build_gpt_model(cfg.model, ctx, padded)
    load_model(args.student, student)
    student.eval()
    vocab, seq, mbs = data.vocab_size, cfg.data.seq_length, cfg.train.micro_batch_size
    kw = dict(tp_group=ctx.tp_group, temperature=cfg.distill.temperature, vocab_size=vocab,
              chunk_tokens=cfg.distill.kl_chunk_tokens)
    kmax = max(ks)
    errs = {g[0]: [] for g in grid}
    sums = {g[0]: [0.0, 0] for g in grid}  # sum KL_store, entries
    exact_all, samples = [], []
    entries = [(d, i) for d, ds in enumerate(data.datasets.valid)
               for i in range(min(len(ds), args.samples))]
    with torch.no_grad():
        for lo in range(0, len(entries), mbs):
            batch = collate(entries[lo:lo + mbs], data.datasets.valid)
            tokens, pos = batch["tokens"], batch["position_ids"]
            zs, zt = student(tokens, pos, None), teacher(tokens, pos, None)
            mask = (batch["loss_mask"] != 0).numpy()
            exact = vocab_parallel_kl(zs, zt, **kw).double().numpy()
            exact_all.append(exact[mask])
            ids, logp, rest = (t.numpy() for t in vocab_parallel_topk(zt, kmax, **kw))
            samples += [(ids[i], logp[i], rest[i]) for i in range(ids.shape[0])]
            for g in grid:
                i2, l2, r2, counts = stored(g, ids, logp, rest, vocab)
                _, kl = vocab_parallel_ce_and_topk_kl(zs, torch.from_numpy(i2),
                                                      torch.from_numpy(l2),
                                                      torch.from_numpy(r2), **kw)
                kl = kl.double().numpy()
                errs[g[0]].append(np.abs(kl - exact)[mask])
                sums[g[0]][0] += float(kl[mask].sum())
                sums[g[0]][1] += int(counts[mask].sum())
    destroy()
    exact = np.concatenate(exact_all)
    work = tempfile.mkdtemp(prefix="bench_store_")
    rows = []
    for g in grid:
        e = np.concatenate(errs[g[0]])
        row = {"label": g[0], "format": g[1], "top_k": g[2], "top_p": g[3], "codec": g[4],
               "id_codec": g[5] or None,
               "kl_err_mean": float(e.mean()), "kl_err_p99": float(np.percentile(e, 99)),
               "kl_of_mean_rel": abs(sums[g[0]][0] - exact.sum()) / exact.sum(),
               "entries_per_token": sums[g[0]][1] / exact.size, "stores": {}}
        for comp in (["none"] if g[1] == 1 else args.compressions.split(",")):
            row["stores"][comp] = store_measure(g, comp, samples, vocab, seq, mbs, work)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("label", "kl_err_mean", "entries_per_token")}),
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump({"tokens": int(exact.size), "mean_kl": float(exact.mean()), "vocab": vocab,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
