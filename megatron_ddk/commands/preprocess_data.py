"""Tokenize JSONL into Megatron-Core indexed datasets: a drop-in for Megatron-LM's
`megatron-ddk preprocess` (core_v0.16.1) -- the same flags with the same meanings and defaults,
the same output files (<output-prefix>_<key>_document.bin/.idx, _sentence with
--split-sentences), byte for byte, for any --workers and --partitions:

    megatron-ddk preprocess --input data.jsonl --output-prefix out/my_corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tokenizer.model \\
        --append-eod --workers 2

Tokenizer types: SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer,
HuggingFaceTokenizer (a local folder), GPT2BPETokenizer (--vocab-file/--merge-file); without
--tokenizer-type the model file decides (.model: SentencePiece; tokenizer.json: Hugging Face).
Other types and options that would change the ids are refused with a message. As in Megatron-LM,
no EOD is appended unless --append-eod. Progress: a bar on a terminal, Megatron-LM's
"Processed N documents" lines otherwise or with --log-interval. Files are written under temporary
names and renamed when complete; a malformed line stops the run naming file:line
(--skip-malformed skips and counts such lines); an input without any document with text is an
error unless --allow-empty; a worker process that dies (e.g. killed for memory) ends the run with
an error naming the input lines. See docs/data.md for the flag table.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

from megatron_ddk.console import messages, results

_T0 = time.perf_counter()


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_ddk.data.preprocessing.megatron_cli import build_parser, job_from_args

    args = build_parser(__doc__).parse_args(argv)
    from megatron_ddk.data.preprocessing.engine import prepare, run_encode
    from megatron_ddk.data.preprocessing.progress import Progress

    try:
        job = job_from_args(args)
        messages().info(f"Opening {', '.join(job.paths)}")
        prepare(job)
        messages().info(f"Time to startup: {time.perf_counter() - _T0:.2f}s")
        if not args.append_eod:
            messages().info("note: no --append-eod, so documents get no EOD token (Megatron-LM's "
                            "default)")
        bar = Progress.auto(args.log_interval, desc=os.path.basename(args.output_prefix),
                            force_lines=args.log_interval is not None)
        try:
            stats = run_encode(job, progress=bar)
        finally:
            bar.close()
    except OSError as err:  # an unwritable output folder, a full disk: a user error (exit 2)
        raise ValueError(f"{err.filename or args.output_prefix}: {err.strerror or err}; nothing "
                         "was written") from None
    except KeyboardInterrupt:
        messages().info("\ninterrupted: temporary files removed, no output written")
        sys.exit(130)
    for key, prefix in job.prefixes.items():
        results().info(f"{prefix}.bin/.idx: {stats.num_documents[key]:,} documents, "
                       f"{stats.num_tokens[key]:,} tokens")
    total = sum(stats.num_tokens.values())
    results().info(f"{stats.seconds:.1f}s ({time.perf_counter() - _T0:.1f}s with start-up), "
                   f"{total / max(stats.seconds, 1e-9):,.0f} tokens/s, {job.workers} workers; "
                   f"{stats.num_empty} empty documents, {stats.num_malformed_skipped} malformed "
                   f"lines skipped"
                   + (f" (first: {stats.first_malformed})" if stats.first_malformed else ""))
    return 0

