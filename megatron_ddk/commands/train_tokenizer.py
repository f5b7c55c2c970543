"""Train a SentencePiece tokenizer on text sampled from several domains.

Each domain gets a share of the sample (equal by default, --domain-shares to change), so no
domain is starved in the vocabulary. Lossless by default: identity normalisation, whitespace
kept, byte fallback, digits split; decode(encode(text)) == text for code and CJK.
Writes <output-prefix>.model, <output-prefix>.vocab and tokenizer_metadata.json (in the same
folder, as megatron.core.tokenizers expects) and prints the model's sha256.

    megatron-ddk train-tokenizer --input data/demo/corpus \\
        --output-prefix data/demo/tokenizer/ddk --vocab-size 8000

--input takes corpus folders (each <name>.jsonl or <name>/ is a domain) and/or single
.jsonl/.txt files (each file is a domain named after it).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from typing import List, Optional

from megatron_ddk.console import results
from megatron_ddk.data.preprocessing.corpus import DomainInput, check_input_files, discover_domains

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def resolve_domains(inputs: List[str]) -> List[DomainInput]:
    """Corpus folders expand to their domains; a file is a domain named after its stem."""
    domains: List[DomainInput] = []
    for item in inputs:
        if os.path.isdir(item):
            domains.extend(discover_domains(item))
        else:
            check_input_files([item])
            name = os.path.splitext(os.path.basename(item))[0]
            domains.append(DomainInput(name=name, paths=[os.path.abspath(item)]))
    names = [d.name for d in domains]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"domain name(s) {dupes} appear more than once in --input")
    return domains


def add_training_args(p: argparse.ArgumentParser) -> None:
    """SentencePiece flags shared with `megatron-ddk build-domains` --train-tokenizer."""
    g = p.add_argument_group("tokenizer training")
    g.add_argument("--vocab-size", type=int, default=8000)
    g.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    g.add_argument("--user-defined-symbols", default="",
                   help="comma-separated pieces always kept whole, e.g. '<|im_start|>,<|im_end|>'")
    g.add_argument("--domain-shares", default=None,
                   help="name=share,... share of the sample per domain (default: equal)")
    g.add_argument("--sample-mb", type=float, default=32.0,
                   help="total training sample, MB of text (a smaller domain is taken whole)")
    g.add_argument("--lossless", action=argparse.BooleanOptionalAction, default=True,
                   help="identity normalisation, whitespace kept, byte fallback")
    g.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--add-dummy-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="SentencePiece's leading-space prefix (LLaMA style)")
    g.add_argument("--character-coverage", type=float, default=0.9995)
    g.add_argument("--max-sentence-bytes", type=int, default=4096,
                   help="longer lines are cut into pieces for training")
    g.add_argument("--seed", type=int, default=1234, help="seed of the per-domain sampling")


def train_from_args(args: argparse.Namespace, domains: List[DomainInput], output_prefix: str,
                    skip_malformed: bool = False) -> str:
    """Sample, train, write; return the .model path."""
    from megatron_ddk.data.tokenizer import parse_shares, sample_domains, train_sentencepiece

    shares = parse_shares(args.domain_shares, [d.name for d in domains])
    start = time.perf_counter()
    sentences = sample_domains(domains, shares, int(args.sample_mb * 1e6), args.seed,
                               json_key=getattr(args, "json_key", "text"),
                               max_sentence_bytes=args.max_sentence_bytes,
                               skip_malformed=skip_malformed, progress=True)
    num_bytes = sum(len(s.encode("utf-8")) + 1 for s in sentences)
    results().info(f"sampled {len(sentences):,} lines / {num_bytes / 1e6:.2f} MB from "
                   f"{len(domains)} domains in {time.perf_counter() - start:.1f}s; training "
                   f"{args.model_type} vocab {args.vocab_size} ...")
    start = time.perf_counter()
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    model = train_sentencepiece(
        sentences, output_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
        user_defined_symbols=symbols, lossless=args.lossless, split_digits=args.split_digits,
        add_dummy_prefix=args.add_dummy_prefix, character_coverage=args.character_coverage,
        max_sentence_bytes=args.max_sentence_bytes)
    results().info(f"trained in {time.perf_counter() - start:.1f}s")
    return model


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="corpus folders and/or .jsonl/.txt files (one domain each)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.model/.vocab")
    p.add_argument("--json-key", default="text")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip (and count) malformed JSONL lines instead of failing")
    add_training_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_ddk.data.tokenizer import tokenizer_hash

    domains = resolve_domains(args.input)  # a ValueError: exit 2 (cli.run_tool)
    model = train_from_args(args, domains, args.output_prefix, args.skip_malformed)
    results().info(f"wrote {model} and {args.output_prefix}.vocab")
    results().info(f"tokenizer hash: {tokenizer_hash(model)}")
    return 0

