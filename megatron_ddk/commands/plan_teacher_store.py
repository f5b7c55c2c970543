"""Disk space of an offline teacher store (tools/cache_teacher_logits.py) for a token budget.

    python tools/plan_teacher_store.py                       # the paper: 15B tokens, Qwen-1.5
    python tools/plan_teacher_store.py --tokens 2e9 --vocab-size 32000 --ks 8,16,32,64

Per token the store keeps K token ids (uint16 when the vocabulary has <= 65,536 entries, else
int32), K log-probabilities (float16, or float32 with --logprob-dtype float32) and the log of the
rest's mass (float32): megatron_ddk.data.teacher_store.bytes_per_token, the same function the
producer records in the store's header. Prints one row per K (decimal TB and binary TiB).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from megatron_ddk.data.teacher_store import bytes_per_token

QWEN15_VOCAB = 151_646
"""Qwen-1.5's tokenizer (the paper's main teacher/student family)."""


def table(tokens: float, vocab_size: int, ks: List[int], logprob_dtype: str) -> str:
    lines = [f"offline teacher store for {tokens:.3g} tokens, vocabulary {vocab_size:,}, "
             f"log-probabilities {logprob_dtype}",
             f"{'K':>6} {'bytes/token':>12} {'TB':>10} {'TiB':>10}"]
    for k in ks:
        b = bytes_per_token(k, vocab_size, logprob_dtype)
        lines.append(f"{k:>6} {b:>12} {tokens * b / 1e12:>10.2f} {tokens * b / 2 ** 40:>10.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=15e9, help="tokens covered (paper: ~15B)")
    p.add_argument("--vocab-size", type=int, default=QWEN15_VOCAB)
    p.add_argument("--ks", default="8,32,128", help="comma list of K")
    p.add_argument("--logprob-dtype", choices=["float16", "float32"], default="float16")
    args = p.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        p.error(f"--ks {args.ks!r}: expected a comma list of integers")
    if args.tokens <= 0 or args.vocab_size < 1 or any(k < 1 for k in ks):
        p.error("--tokens, --vocab-size and every K must be positive")
    print(table(args.tokens, args.vocab_size, ks, args.logprob_dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
