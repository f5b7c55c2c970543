"""Disk space of an offline teacher store (`megatron-ddk cache-teacher`) for a token budget.

    megatron-ddk plan-teacher-store                          # the paper: 15B tokens, Qwen-1.5
    megatron-ddk plan-teacher-store --store runs/quickstart/teacher_store/seed1234
    megatron-ddk plan-teacher-store --tokens 2e9 --vocab-size 32000 --ks 8,16,32,64

Format 2 (the default store): bytes per token follow from the entries kept per token, which only
a real store measures. With --store DIR the measured entries per token come from that store's
header (and its measured bytes per token on disk, at its own vocabulary, are shown); without it,
from bench/offline_teacher.py's default setting (BENCH_ENTRIES_PER_TOKEN). The projection to
--vocab-size is data/store_codec.bytes_per_token, uncompressed (zstd's gain depends on the data
and is not projected): with the ef id codec (the default) the most the ids can take at that
vocabulary whatever they are (data/store_ids.ef_mean_bits_bound), with packed ceil(log2(vocab))
bits per id. Format 1 rows (fixed K; uint16 ids up to
65,536 entries, else int32; float16 log-probabilities) are teacher_store.bytes_per_token, for
comparison. Prints decimal TB and binary TiB.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from megatron_ddk.console import results
from megatron_ddk.data.store_codec import bytes_per_token as v2_bytes
from megatron_ddk.data.teacher_store import bytes_per_token as v1_bytes

QWEN15_VOCAB = 151_646
"""Qwen-1.5's tokenizer (the paper's main teacher/student family)."""

BENCH_SETTING = {"top_k": 16, "top_p": 1.0, "logprob_codec": "q4", "id_codec": "ef",
                 "tail_samples": 8}
"""The producer's default (training/teacher_cache.py), chosen from bench/offline_teacher.py's
table (docs/offline_teacher.md, "Benchmark")."""

BENCH_ENTRIES_PER_TOKEN = 16.0
"""Entries per token the bench measured at BENCH_SETTING on the quickstart's teacher (top_p = 1
keeps all K; the 8 tail draws come on top). At 151,646 entries that is at most 60.4 bytes/token
(ef: the worst case over the ids, not the demo's 4,096-token ids), 0.308 of format 1 K = 32."""


def _row(label: str, bpt: float, tokens: float) -> str:
    return f"{label:<52} {bpt:>11.1f} {tokens * bpt / 1e12:>9.2f} {tokens * bpt / 2 ** 40:>9.2f}"


def table(tokens: float, vocab_size: int, ks: List[int], setting: dict, entries: float,
          source: str, measured: Optional[float] = None) -> str:
    head = (f"offline teacher store for {tokens:.3g} tokens, vocabulary {vocab_size:,}\n"
            f"{'store':<52} {'bytes/token':>11} {'TB':>9} {'TiB':>9}")
    lines = [head]
    id_codec, tail = setting.get("id_codec", "packed"), int(setting.get("tail_samples", 0))
    b = v2_bytes(entries, vocab_size, setting["logprob_codec"], setting["top_k"],
                 setting["top_p"], id_codec, tail)
    lines.append(_row(f"format 2 {id_codec} K={setting['top_k']} top_p={setting['top_p']:g} "
                      f"{setting['logprob_codec']}" + (f" tail {tail}" if tail else "")
                      + f" ({entries:.2f} entries/token)", b, tokens))
    for k in ks:
        lines.append(_row(f"format 1 K={k} float16", v1_bytes(k, vocab_size, "float16"), tokens))
    lines.append(f"format 2 entries per token: {source}")
    if measured is not None:
        lines.append(f"that store measured {measured:.1f} bytes/token on disk at its own "
                     f"vocabulary (index, checksums and any compression included)")
    return "\n".join(lines)


def _from_store(root: str):
    from megatron_ddk.data.teacher_store import read_header

    header = read_header(root)
    if header["format_version"] != 2 or "entries_per_token" not in header:
        raise ValueError(f"{root}: a format-{header['format_version']} store (or unfinished): "
                         f"its size is the fixed format-1 formula, nothing to measure")
    enc = header["encoding"]
    setting = {k: enc[k] for k in ("top_k", "top_p", "logprob_codec")}
    setting["id_codec"] = enc.get("id_codec", "packed")  # stores written before ef: packed
    setting["tail_samples"] = int(enc.get("tail_samples", 0))
    return setting, float(header["entries_per_token"]), f"measured by {root}", \
        float(header["measured_bytes_per_token"])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=15e9, help="tokens covered (paper: ~15B)")
    p.add_argument("--vocab-size", type=int, default=QWEN15_VOCAB)
    p.add_argument("--ks", default="32", help="comma list of K for the format-1 rows")
    p.add_argument("--store", default=None,
                   help="a format-2 store whose measured entries per token to use")
    args = p.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        raise ValueError(f"--ks {args.ks!r}: expected a comma list of integers") from None
    if args.tokens <= 0 or args.vocab_size < 1 or any(k < 1 for k in ks):
        raise ValueError("--tokens, --vocab-size and every K must be positive")
    if args.store:  # a user error is a ValueError naming the folder (one `error:` line)
        setting, entries, source, measured = _from_store(args.store)
    else:
        setting, entries, measured = BENCH_SETTING, BENCH_ENTRIES_PER_TOKEN, None
        source = "bench/offline_teacher.py's default setting on the quickstart's teacher"
    results().info(table(args.tokens, args.vocab_size, ks, setting, entries, source, measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
