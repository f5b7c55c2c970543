"""Cache the teacher's top-K log-probabilities per (domain, sample id) for offline KD / DDK.

    megatron-ddk cache-teacher --config megatron_ddk/examples/quickstart/ddk.yaml \\
        --out runs/quickstart/teacher_store
    torchrun --nproc-per-node 8 -m megatron_ddk.cli cache-teacher --config RUN.yaml --out DIR \\
        --max-samples-per-domain 120000 parallel.tensor_model_parallel_size=4

Runs the run config's teacher (distill.teacher / teacher_load; any TP/PP/DP layout of its
parallel section) over each domain's training samples and writes a store that a run reads with
`distill.teacher_logits: DIR` instead of running the teacher (docs/offline_teacher.md). Format 2
(default): per token the fewest of the top-K entries reaching --top-p, the ids as an
Elias-Fano coded set (--id-codec ef) or bit-packed (packed), --logprob-codec log-probabilities,
optional --compression zstd, and with --tail-samples M the mass outside the top K as M ids drawn
from it instead of one rest bucket. --store-format 1 (or the
format-1 flag --logprob-dtype) writes the fixed-K format of earlier releases. An interrupted
run, restarted with the same arguments, resumes where it stopped. Exit status 0, or 2 with one
`error:` line on bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from megatron_ddk.data.store_codec import (
        DEFAULT_COMPRESSION,
        DEFAULT_ID_CODEC,
        DEFAULT_LOGPROB_CODEC,
        DEFAULT_STORE_FORMAT,
        DEFAULT_TAIL_SAMPLES,
        DEFAULT_TOP_K,
        DEFAULT_TOP_P,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the KD / DDK run YAML (its teacher is cached)")
    p.add_argument("--out", required=True, help="store folder (created; resumed if present)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"tokens kept per position (default {DEFAULT_TOP_K})")
    p.add_argument("--domains", nargs="+", default=None, help="only these domains (default all)")
    p.add_argument("--max-samples-per-domain", type=int, default=None,
                   help="cache only the first N samples of each domain's draw order (what a "
                        "planned run can consume: tools/simulate_mixture.py reports it)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                   help=f"keep per token the fewest entries reaching this probability, at most "
                        f"--top-k (1: all K; default {DEFAULT_TOP_P})")
    p.add_argument("--logprob-codec", default=DEFAULT_LOGPROB_CODEC,
                   help=f"float32 | float16 | q2..q12 (b-bit log-scale codes; default "
                        f"{DEFAULT_LOGPROB_CODEC})")
    p.add_argument("--id-codec", choices=["packed", "ef"], default=DEFAULT_ID_CODEC,
                   help=f"token ids: ef (Elias-Fano over each token's id set, ~n log2(V/n) + 2n "
                        f"bits) or packed (ceil(log2 V) bits each); default {DEFAULT_ID_CODEC}")
    p.add_argument("--tail-samples", type=int, default=None, metavar="M",
                   help=f"replace the rest bucket by M ids drawn from the teacher's mass outside "
                        f"the top K (an unbiased sample of the tail; needs --top-p 1); 0: the "
                        f"bucket alone (default {DEFAULT_TAIL_SAMPLES} with format 2, --top-p 1 "
                        f"and --top-k below the vocabulary, else 0)")
    p.add_argument("--compression", choices=["none", "zstd"], default=DEFAULT_COMPRESSION,
                   help="zstd per sample chunk (needs pip install 'megatron-ddk[formats]')")
    p.add_argument("--store-format", type=int, choices=[1, 2], default=None,
                   help=f"store format (default {DEFAULT_STORE_FORMAT}; 1: fixed K, dense)")
    p.add_argument("--logprob-dtype", choices=["float16", "float32"], default=None,
                   help="format 1's log-probability dtype (implies --store-format 1)")
    p.add_argument("--cover-runs", nargs="+", default=None, metavar="RUN.yaml",
                   help="cover what any of these run configs (same seed) can draw, per domain, "
                        "instead of --max-samples-per-domain")
    p.add_argument("--shard-samples", type=int, default=None,
                   help="samples per shard (default: about 64 MiB of store per shard)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides of the config")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_ddk.console import run_command
    from megatron_ddk.training.entry import cache_teacher_main

    return run_command(cache_teacher_main, args.config, args.overrides, args.out,
                       top_k=args.top_k, domains=args.domains,
                       max_samples_per_domain=args.max_samples_per_domain,
                       logprob_dtype=args.logprob_dtype, shard_samples=args.shard_samples,
                       top_p=args.top_p, logprob_codec=args.logprob_codec,
                       compression=args.compression, id_codec=args.id_codec,
                       store_format=args.store_format,
                       cover_runs=args.cover_runs, tail_samples=args.tail_samples)


if __name__ == "__main__":
    sys.exit(main())
