"""Megatron-LM's `megatron-ddk preprocess` command line (core_v0.16.1) on megatron_ddk's engine.

build_parser() accepts every flag Megatron-LM's tool takes (its own and its tokenizer
arguments, with the same defaults and meanings); job_from_args() turns them into an EncodeJob,
refusing what is not implemented with a message that says so (never argparse's "unrecognized"
or "invalid choice"). Differences, all supersets: --workers defaults to the CPU count (required
there); --input may be a glob with any --partitions (sorted; Megatron-LM globs unsorted and only
with --partitions > 1) and may be .txt (one document per line) or .gz; blank JSONL lines are
skipped (Megatron-LM stops); every json key gets its .idx (Megatron-LM finalizes only the last
key's); no partition files or per-partition datasets are left beside the input/output; nothing
is downloaded (nltk punkt must be installed for --split-sentences), and splitting runs in one
pass (Megatron-LM with --partitions 1 writes the split file and stops); --workers need not be a
multiple of --partitions; an input without any document with text is an error (Megatron-LM
writes an empty dataset; --allow-empty does too). Extra flags: --skip-malformed, --allow-empty,
--eos-token (auto Hugging Face only), --no-append-eod.

Imports argparse, glob, json and the engine modules; nothing heavy at import time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Dict, List

from megatron_ddk.data.megatron_tokenizers import (
    MEGATRON_LM_TYPES,
    TokenizerSpec,
    UnsupportedTokenizer,
)
from megatron_ddk.data.preprocessing.engine import EncodeJob

_LIBRARY = {"HuggingFaceTokenizer": "huggingface", "GPT2BPETokenizer": "megatron",
            "SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer":
            "sentencepiece", "Llama2Tokenizer": "sentencepiece"}


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer (Megatron-LM's _add_tokenizer_args)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="size of vocab before EOD or padding (NullTokenizer/TikTokenizer only; "
                        "no effect on the supported types)")
    g.add_argument("--padded-vocab-size", type=int, default=None,
                   help="model vocabulary size (training only; no effect here)")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    g.add_argument("--vocab-extra-ids", type=int, default=0,
                   help="T5 sentinel tokens (Megatron-LM's tool forces 0; no effect)")
    g.add_argument("--tokenizer-type", default=None, choices=MEGATRON_LM_TYPES,
                   help="supported: SentencePieceTokenizer, GPTSentencePieceTokenizer, "
                        "Llama2Tokenizer, HuggingFaceTokenizer (local folder), GPT2BPETokenizer;"
                        " omitted: decided by --tokenizer-model (.model or tokenizer.json)")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model, or Hugging Face folder / tokenizer.json")
    g.add_argument("--tokenizer-metadata", default=None,
                   help="Megatron-Core tokenizer metadata JSON (its library must match the type)")
    g.add_argument("--tokenizer-special-tokens", nargs="+", default=None,
                   help="extra special tokens (HuggingFaceTokenizer only)")
    g.add_argument("--legacy-tokenizer", action="store_true",
                   help="megatron/training's tokenizer classes (GPTSentencePiece, Llama2 = bos "
                        "prepended, GPT2BPE, HuggingFace = with special tokens)")
    g.add_argument("--tiktoken-pattern", default=None, help="TikTokenizer only (not supported)")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                   help="TikTokenizer only (not supported)")
    g.add_argument("--tiktoken-special-tokens", nargs="+", default=None,
                   help="TikTokenizer only (not supported)")
    g.add_argument("--tokenizer-sentencepiece-legacy", action="store_true",
                   help="SentencePiece wrapper legacy mode (same ids without special tokens)")
    g.add_argument("--tokenizer-hf-use-fast", action="store_true",
                   help="load the fast Hugging Face tokenizer (default: slow when one exists)")
    g.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                   help="Hugging Face ids include special tokens (tokenizer(text).input_ids)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow tokenizer code from the local model folder")
    g.add_argument("--eos-token", default=None,
                   help="(megatron-ddk) eod token of a tokenizer.json naming none, when "
                        "--tokenizer-type is omitted")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """Megatron-LM preprocess_data.py's arguments, plus megatron-ddk's few extras."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _tokenizer_args(p)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="JSONL file (.jsonl/.json, or .txt: one document per line; .gz ok); a "
                        "glob pattern when no such file exists")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys to tokenize, one dataset each")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (nltk punkt; output *_sentence.bin/.idx)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="keep newlines between sentences when splitting")
    g = p.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true", default=False,
                   help="append the eod token to each document (Megatron-LM's default: off)")
    g.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="(megatron-ddk) the default; turns off an earlier --append-eod")
    g.add_argument("--lang", default="english", help="punkt language for --split-sentences")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx (…_sentence with splitting)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="encoding processes (default: CPU count); output does not depend on it")
    g.add_argument("--partitions", type=int, default=1,
                   help="Megatron-LM's file partitions: documents in its partition-merge order "
                        "(round robin unless --keep-sequential-samples); no files left behind")
    g.add_argument("--log-interval", type=int, default=None,
                   help="a progress line every N documents (Megatron-LM's format; default: a "
                        "bar on a terminal, else every 1000)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="with --partitions > 1: keep the input order")
    g.add_argument("--skip-malformed", action="store_true",
                   help="(megatron-ddk) skip and count malformed lines instead of stopping")
    g.add_argument("--allow-empty", action="store_true",
                   help="(megatron-ddk) write an empty dataset when the input holds no document "
                        "with text (default: an error naming the input, nothing written)")
    return p


def resolve_inputs(pattern: str) -> List[str]:
    """The file itself, or the sorted glob matches; ValueError when nothing matches."""
    if os.path.exists(pattern):
        return [pattern]
    matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not matches:
        raise ValueError(f"input file {pattern} does not exist (and matches no files as a glob)")
    return matches


def _check_metadata(path: str, kind: str) -> None:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--tokenizer-metadata {path}: cannot read it ({err})") from None
    if meta.get("tokenizer_class") or meta.get("library") not in (None, _LIBRARY.get(kind)):
        raise UnsupportedTokenizer(
            f"--tokenizer-metadata {path} asks for library {meta.get('library')!r} / class "
            f"{meta.get('tokenizer_class')!r}; only the library of --tokenizer-type {kind} "
            f"({_LIBRARY.get(kind)!r}) is supported")


def tokenizer_spec(args: argparse.Namespace) -> TokenizerSpec:
    """The TokenizerSpec of the tokenizer arguments; UnsupportedTokenizer for what is not
    implemented."""
    kind = args.tokenizer_type or "auto"
    if args.tokenizer_special_tokens and kind != "HuggingFaceTokenizer":
        raise UnsupportedTokenizer(
            "--tokenizer-special-tokens is supported with HuggingFaceTokenizer only (Megatron-LM "
            "rejects it for SentencePiece models unless --tokenizer-sentencepiece-legacy, whose "
            "special-token scanning is not implemented here)")
    if args.tokenizer_metadata and kind != "auto":
        _check_metadata(args.tokenizer_metadata, kind)
    if args.eos_token and kind != "auto":
        raise ValueError("--eos-token is for a tokenizer.json without --tokenizer-type; with "
                         "--tokenizer-type the tokenizer's own eos token is the eod")
    return TokenizerSpec(
        tokenizer_type=kind, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
        merge_file=args.merge_file, legacy_tokenizer=args.legacy_tokenizer,
        hf_use_fast=args.tokenizer_hf_use_fast,
        hf_include_special_tokens=args.tokenizer_hf_include_special_tokens,
        trust_remote_code=args.trust_remote_code, eos_token=args.eos_token,
        special_tokens=tuple(args.tokenizer_special_tokens or ()))


def output_prefixes(args: argparse.Namespace, paths: List[str]) -> Dict[str, str]:
    """<output-prefix>_<key>_<document|sentence> per json key (key 'text' for .txt input)."""
    from megatron_ddk.data.preprocessing.engine import line_format

    keys = ["text"] if all(line_format(p) == "txt" for p in paths) else list(args.json_keys)
    level = "sentence" if args.split_sentences else "document"
    return {k: f"{args.output_prefix}_{k}_{level}" for k in keys}


def job_from_args(args: argparse.Namespace) -> EncodeJob:
    """The EncodeJob a Megatron-LM command line asks for (ValueError for bad values)."""
    if args.workers < 1 or args.partitions < 1:
        raise ValueError(f"--workers ({args.workers}) and --partitions ({args.partitions}) "
                         "must be >= 1")
    if args.log_interval is not None and args.log_interval < 1:
        raise ValueError(f"--log-interval {args.log_interval} must be >= 1")
    if args.tokenizer_type is None and not args.tokenizer_model:
        raise ValueError("pass --tokenizer-model (and --tokenizer-type, or --vocab-file/"
                         "--merge-file with --tokenizer-type GPT2BPETokenizer)")
    paths = resolve_inputs(args.input)
    return EncodeJob(
        paths=paths, prefixes=output_prefixes(args, paths), tokenizer=tokenizer_spec(args),
        append_eod=args.append_eod, workers=args.workers, keep_empty=True,
        split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, lang=args.lang,
        partitions=args.partitions, keep_sequential_samples=args.keep_sequential_samples,
        skip_malformed=args.skip_malformed, allow_empty=args.allow_empty)
