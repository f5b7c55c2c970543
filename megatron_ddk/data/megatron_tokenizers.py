"""Megatron-LM's tokenizer types as batch encoders for preprocessing.

A BatchEncoder turns a list of texts into a list of token-id lists, and names the end-of-document
id (eod) and the vocabulary size (which decides the .bin dtype: uint16 below 65500, else int32,
as Megatron-Core's DType.optimal_dtype). Each type reproduces what Megatron-LM core_v0.16.1's
`megatron-ddk preprocess` gets from its tokenizer (`--tokenizer-type`, default new tokenizer
system; `--legacy-tokenizer` for megatron/training/tokenizer):

- SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer: ids = the model's plain
  encoding (Megatron-Core's SentencePiece wrapper with its defaults: no special-token scanning,
  extra whitespace left to the model), eod = the model's eos id. Legacy Llama2Tokenizer prepends
  bos to every tokenized text, as megatron/training's _Llama2Tokenizer does.
- GPT2BPETokenizer: GPT-2 byte-level BPE from --vocab-file/--merge-file, eod = <|endoftext|>,
  the text "<|endoftext|>" not treated as special (megatron/training's _GPT2BPETokenizer; the new
  system's variant downloads the GPT-2 files from the hub and cannot run offline).
- HuggingFaceTokenizer: a local folder, loaded through Megatron-Core's own Hugging Face wrapper
  (same special-token set-up and ids as Megatron-LM); a fast tokenizer is then run in batches
  through its Rust backend, a slow one text by text.
- auto (no --tokenizer-type, and megatron_ddk's own pipeline): a SentencePiece .model as
  GPTSentencePieceTokenizer, a tokenizer.json or its folder as megatron_ddk.data.tokenizer builds
  it (the tokenizer training uses).
Other Megatron-LM types are refused with a message (UnsupportedTokenizer).

Imports sentencepiece / tokenizers / transformers / megatron.core lazily, only for the type in
use (a SentencePiece run never imports torch); imports megatron_ddk.data.tokenizer only for the
auto Hugging Face case. Nothing else from megatron_ddk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

SP_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
SUPPORTED_TYPES = SP_TYPES + ("GPT2BPETokenizer", "HuggingFaceTokenizer")
MEGATRON_LM_TYPES = (
    "BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
    "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer",
)
"""Every --tokenizer-type choice of Megatron-LM core_v0.16.1 (accepted by argparse, then either
supported or refused with a message)."""


class UnsupportedTokenizer(ValueError):
    """A Megatron-LM tokenizer option this preprocessor does not implement."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What to build; picklable, so worker processes can build their own encoder."""

    tokenizer_type: str = "auto"
    """A Megatron-LM --tokenizer-type, or 'auto' (decided by the model file)."""

    tokenizer_model: Optional[str] = None
    """SentencePiece .model, or Hugging Face folder / tokenizer.json."""

    vocab_file: Optional[str] = None
    """GPT2BPETokenizer vocab.json (HuggingFaceTokenizer: passed to AutoTokenizer)."""

    merge_file: Optional[str] = None
    """GPT2BPETokenizer merges.txt (HuggingFaceTokenizer: passed to AutoTokenizer)."""

    legacy_tokenizer: bool = False
    """Megatron-LM --legacy-tokenizer: megatron/training's tokenizer classes."""

    hf_use_fast: bool = False
    """--tokenizer-hf-use-fast (Megatron-LM's default is the slow tokenizer when one exists)."""

    hf_include_special_tokens: bool = False
    """--tokenizer-hf-include-special-tokens: ids = tokenizer(text).input_ids (adds bos etc.)."""

    trust_remote_code: bool = False
    """--trust-remote-code for AutoTokenizer (code in the local folder only)."""

    eos_token: Optional[str] = None
    """auto Hugging Face only: end-of-document token of a tokenizer that names none."""

    special_tokens: Tuple[str, ...] = ()
    """HuggingFaceTokenizer: additional special tokens (--tokenizer-special-tokens)."""


class BatchEncoder:
    """encode_batch(texts) -> one list of ids per text; eod, vocab_size."""

    eod: Optional[int] = None
    vocab_size: int = 0

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        raise NotImplementedError


class SentencePieceEncoder(BatchEncoder):
    """A SentencePiece model; a batch is encoded by SentencePiece's own threads."""

    def __init__(self, model_path: str, prepend_bos: bool = False, num_threads: int = 1) -> None:
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"tokenizer model {model_path} is not a SentencePiece model ({err})"
                             "; pass a .model file, or a Hugging Face folder with "
                             "--tokenizer-type HuggingFaceTokenizer") from None
        eos = self.sp.eos_id()
        self.eod = eos if eos >= 0 else None
        self.vocab_size = self.sp.get_piece_size()
        self.bos = self.sp.bos_id()
        if prepend_bos and self.bos < 0:
            raise ValueError(f"tokenizer model {model_path} has no bos token, which legacy "
                             "Llama2Tokenizer prepends to every text")
        self.prepend_bos, self.num_threads = prepend_bos, max(1, num_threads)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        ids = self.sp.encode(texts, num_threads=self.num_threads) if texts else []
        if self.prepend_bos:
            ids = [[self.bos] + x for x in ids]
        return ids


class RustEncoder(BatchEncoder):
    """A `tokenizers.Tokenizer` (a fast HF backend or GPT-2 BPE built from its files)."""

    def __init__(self, backend, eod: Optional[int], vocab_size: int,
                 add_special_tokens: bool) -> None:
        self.backend, self.eod, self.vocab_size = backend, eod, vocab_size
        self.add_special_tokens = add_special_tokens

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        if not texts:
            return []
        encodings = self.backend.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return [e.ids for e in encodings]


class SlowHFEncoder(BatchEncoder):
    """A Python (slow) transformers tokenizer, text by text as Megatron-Core's wrapper does."""

    def __init__(self, hf, eod: Optional[int], vocab_size: int, include_special: bool) -> None:
        self.hf, self.eod, self.vocab_size = hf, eod, vocab_size
        self.include_special = include_special

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        if self.include_special:
            return [list(self.hf(t).input_ids) for t in texts]
        return [list(self.hf.convert_tokens_to_ids(self.hf.tokenize(t))) for t in texts]


def _need(path: Optional[str], flag: str, tokenizer_type: str) -> str:
    if not path:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path} does not exist")
    return path


def _gpt2_bpe(spec: TokenizerSpec) -> BatchEncoder:
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = _need(spec.vocab_file, "--vocab-file", "GPT2BPETokenizer")
    merges = _need(spec.merge_file, "--merge-file", "GPT2BPETokenizer")
    with open(vocab, encoding="utf-8") as f:
        table = json.load(f)
    if "<|endoftext|>" not in table:
        raise ValueError(f"--vocab-file {vocab} has no <|endoftext|> token, GPT-2's end of "
                         "document")
    backend = Tokenizer(models.BPE.from_file(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return RustEncoder(backend, table["<|endoftext|>"], len(table), add_special_tokens=False)


def _from_transformers(hf, eod: Optional[int], include_special: bool) -> BatchEncoder:
    if getattr(hf, "is_fast", False):
        return RustEncoder(hf.backend_tokenizer, eod, len(hf), include_special)
    return SlowHFEncoder(hf, eod, len(hf), include_special)


def _huggingface(spec: TokenizerSpec) -> BatchEncoder:
    path = _need(spec.tokenizer_model, "--tokenizer-model", "HuggingFaceTokenizer")
    if spec.legacy_tokenizer:  # megatron/training's _HuggingFaceTokenizer
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        return _from_transformers(hf, hf.eos_token_id, include_special=True)
    from megatron.core.tokenizers import MegatronTokenizer

    kwargs = dict(vocab_file=spec.vocab_file, merges_file=spec.merge_file,
                  additional_special_tokens=list(spec.special_tokens), use_fast=spec.hf_use_fast,
                  trust_remote_code=spec.trust_remote_code,
                  include_special_tokens=spec.hf_include_special_tokens)
    tok = MegatronTokenizer.from_pretrained(tokenizer_path=path,
                                            metadata_path={"library": "huggingface"}, **kwargs)
    return _from_transformers(tok._tokenizer.tokenizer, tok.eod, spec.hf_include_special_tokens)


def _auto(spec: TokenizerSpec, num_threads: int) -> BatchEncoder:
    from megatron_ddk.data.tokenizer import _check_exists, is_hf_tokenizer

    path = _check_exists(spec.tokenizer_model)
    if not is_hf_tokenizer(path):
        return SentencePieceEncoder(path, num_threads=num_threads)
    from megatron_ddk.data.tokenizer import build_tokenizer

    tok = build_tokenizer(path, spec.eos_token)  # the tokenizer training uses, eos fallback
    return _from_transformers(tok._tokenizer.tokenizer, tok.eod, include_special=False)


def build_encoder(spec: TokenizerSpec, num_threads: int = 1) -> BatchEncoder:
    """The encoder for spec; ValueError (UnsupportedTokenizer for a type or option not
    implemented) with the flag to change."""
    kind = spec.tokenizer_type
    if kind == "auto":
        return _auto(spec, num_threads)
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedTokenizer(
            f"--tokenizer-type {kind} is not supported by megatron-ddk's preprocess_data.py "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); use Megatron-LM's own "
            "`megatron-ddk preprocess` for it")
    if kind in SP_TYPES:
        if spec.legacy_tokenizer and kind == "SentencePieceTokenizer":
            raise UnsupportedTokenizer(
                "--legacy-tokenizer with SentencePieceTokenizer (megatron/training's wrapper with "
                "its own <EOD>/<MASK>/... tokens) is not supported; drop --legacy-tokenizer or "
                "use GPTSentencePieceTokenizer")
        path = _need(spec.tokenizer_model, "--tokenizer-model", kind)
        legacy_bos = spec.legacy_tokenizer and kind == "Llama2Tokenizer"
        return SentencePieceEncoder(path, prepend_bos=legacy_bos, num_threads=num_threads)
    if kind == "GPT2BPETokenizer":
        return _gpt2_bpe(spec)
    return _huggingface(spec)
