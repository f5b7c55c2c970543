"""Helper of bench/offline_teacher.py: how far the top-K KL is from the exact KL on held-out tokens.

    .venv/bin/python bench/offline_teacher_kl.py --config KD_RUN.yaml --student CKPT --ks 8,32,128

Builds the run's teacher and the student checkpoint (one process, TP=1), runs both over every
validation sample of every domain, and compares per token the exact KL(p_T || p_S)
(losses/kl.vocab_parallel_kl) with the top-K KL the offline teacher gives
(losses/topk_kl.vocab_parallel_ce_and_topk_kl on vocab_parallel_topk's output, the
log-probabilities rounded to float16 as the store keeps them). Prints one JSON line:
{K: mean over tokens of |KL_K - KL| / KL, "K_of_mean": |sum KL_K - sum KL| / sum KL, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--ks", default="8,32,128")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]

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
    kw = dict(tp_group=ctx.tp_group, temperature=cfg.distill.temperature,
              vocab_size=data.vocab_size, chunk_tokens=cfg.distill.kl_chunk_tokens)
    sums = {k: [0.0, 0.0] for k in ks}  # per K: sum |rel err| per token, sum KL_K
    total_kl, n_tokens = 0.0, 0
    entries = [(d, i) for d, ds in enumerate(data.datasets.valid) for i in range(len(ds))]
    mbs = cfg.train.micro_batch_size
    with torch.no_grad():
        for lo in range(0, len(entries), mbs):
            batch = collate(entries[lo:lo + mbs], data.datasets.valid)
            tokens, pos = batch["tokens"], batch["position_ids"]
            zs, zt = student(tokens, pos, None), teacher(tokens, pos, None)
            mask = batch["loss_mask"] != 0
            exact = vocab_parallel_kl(zs, zt, **kw)[mask].double()
            total_kl += float(exact.sum())
            n_tokens += int(mask.sum())
            for k in ks:
                ids, logp, rest = vocab_parallel_topk(zt, k, **kw)
                _, kl_k = vocab_parallel_ce_and_topk_kl(zs, ids, logp.half().float(), rest, **kw)
                kl_k = kl_k[mask].double()
                sums[k][0] += float(((kl_k - exact).abs() / exact.clamp_min(1e-12)).sum())
                sums[k][1] += float(kl_k.sum())
    destroy()
    out = {"tokens": n_tokens, "mean_kl": total_kl / n_tokens}
    for k in ks:
        out[str(k)] = sums[k][0] / n_tokens
        out[f"{k}_of_mean"] = abs(sums[k][1] - total_kl) / total_kl
    print(json.dumps(out))


if __name__ == "__main__":
    main()
