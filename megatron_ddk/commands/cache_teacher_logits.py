"""Cache the teacher's top-K log-probabilities per (domain, sample id) for offline KD / DDK.

    python tools/cache_teacher_logits.py --config examples/quickstart/ddk.yaml \\
        --out runs/quickstart/teacher_store --top-k 32
    torchrun --nproc-per-node 8 tools/cache_teacher_logits.py --config RUN.yaml --out DIR \\
        --max-samples-per-domain 120000 parallel.tensor_model_parallel_size=4

Runs the run config's teacher (distill.teacher / teacher_load; any TP/PP/DP layout of its
parallel section) over each domain's training samples and writes a store that a run reads with
`distill.teacher_logits: DIR` instead of running the teacher (docs/offline_teacher.md). An
interrupted run, restarted with the same arguments, resumes where it stopped. Exit status 0, or
2 with one `error:` line on bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from megatron_ddk.training.teacher_cache import DEFAULT_TOP_K

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
    p.add_argument("--logprob-dtype", choices=["float16", "float32"], default="float16")
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
                       logprob_dtype=args.logprob_dtype, shard_samples=args.shard_samples)


if __name__ == "__main__":
    sys.exit(main())
