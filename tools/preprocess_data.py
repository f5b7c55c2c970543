"""Tokenize one JSONL (or .txt) input into Megatron-Core indexed datasets (.bin/.idx).

A drop-in for Megatron-LM's tools/preprocess_data.py where the flags overlap: one input, one
dataset per json key, named <output-prefix>_<key>_document.bin/.idx, EOD appended to every
document (--append-eod is accepted; --no-append-eod turns it off). No validation hold-out here:
tools/build_domains.py does that per domain.

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/my_corpus \\
        --tokenizer-model tokenizer.model --workers 2

--tokenizer-model: any SentencePiece .model (a released one such as LLaMA's tokenizer.model
works as is, nothing is written beside it) or a Hugging Face tokenizer.json (needs
`transformers`). Output bytes do not depend on --workers. Files are written under a temporary
name and renamed when complete. A malformed line stops the run with file:line in the message;
--skip-malformed skips such lines and reports how many.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402
from typing import List, Optional  # noqa: E402

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL (.jsonl/.json) or .txt file")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx per json key")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON fields to tokenize, one dataset each (ignored for .txt)")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model or Hugging Face tokenizer.json")
    p.add_argument("--tokenizer-type", default=None,
                   help="accepted for Megatron-LM compatibility; the type is read from the file")
    p.add_argument("--eos-token", default=None,
                   help="end-of-document token of a Hugging Face tokenizer that names none")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (output is identical for any count)")
    p.add_argument("--append-eod", action="store_true", default=True,
                   help="append the EOD (eos) token to each document (default)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed lines instead of stopping")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from megatron_ddk.data.corpus import input_format
    from megatron_ddk.data.preprocess import tokenize_to_datasets

    try:
        keys = ["text"] if input_format(args.input) == "txt" else args.json_keys
        prefixes = {k: f"{args.output_prefix}_{k}_document" for k in keys}
        result = tokenize_to_datasets(
            [args.input], prefixes, args.tokenizer_model, workers=args.workers,
            append_eod=args.append_eod, skip_malformed=args.skip_malformed, progress=True,
            eos_token=args.eos_token)
    except ValueError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print("\ninterrupted: temporary files removed, no output written", file=sys.stderr)
        sys.exit(130)
    for key, prefix in result.prefixes.items():
        print(f"{prefix}.bin/.idx: {result.num_documents[key]:,} documents, "
              f"{result.num_tokens[key]:,} tokens")
    total = sum(result.num_tokens.values())
    print(f"{result.seconds:.1f}s, {total / max(result.seconds, 1e-9):,.0f} tokens/s, "
          f"{args.workers} workers; skipped: {result.num_empty_skipped} empty documents, "
          f"{result.num_malformed_skipped} malformed lines")


if __name__ == "__main__":
    main()
