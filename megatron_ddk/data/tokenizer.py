"""Tokenizers: build a Megatron-Core tokenizer from a model file, hash it, train a lossless
SentencePiece model.

- build_tokenizer(path): a megatron.core.tokenizers object (what GPTDataset takes: eod, pad,
  vocab_size, unique_identifiers; eod = the model's eos id) from a SentencePiece .model, or from
  a Hugging Face tokenizer.json (or its folder) when `transformers` is importable.
  Megatron-Core's loader wants a tokenizer_metadata.json beside the model; it is used when present
  and of the right library, otherwise the metadata is passed explicitly, so released read-only
  models (LLaMA's tokenizer.model) need nothing written next to them.
- tokenizer_hash(path): "sha256:<hex of the file bytes>", recorded in the domain manifest and in
  checkpoints so teacher, student and datasets provably share one tokenizer.
- train_sentencepiece(...): BPE (default) or unigram, lossless by default (identity
  normalisation, no whitespace collapsing, byte fallback: decode(encode(x)) == x for code, tabs,
  CJK), writes <prefix>.model, <prefix>.vocab and tokenizer_metadata.json.

megatron.core (and with it torch) is imported lazily inside the functions that need it; this
module imports nothing else from megatron_ddk.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
from typing import Iterable, Optional, Sequence

from megatron_ddk.atomic import write_atomic

logger = logging.getLogger(__name__)

METADATA_FILE = "tokenizer_metadata.json"
"""Megatron-Core's tokenizer loader reads this file from the model's folder."""

SP_METADATA = {"library": "sentencepiece", "model_type": "gpt"}
HF_METADATA = {"library": "huggingface", "model_type": "gpt"}
HF_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
"""End-of-document tokens tried, in order, for a tokenizer.json that names no eos token."""


def _check_exists(model_path: str) -> str:
    if not model_path or not os.path.exists(model_path):
        raise ValueError(
            f"tokenizer model {model_path!r} does not exist; pass the path of a SentencePiece "
            ".model or a tokenizer.json (train one with `megatron-ddk train-tokenizer`)"
        )
    return os.path.abspath(model_path)


def tokenizer_hash(model_path: str) -> str:
    """'sha256:<hex>' of the model file's bytes (of tokenizer.json for a Hugging Face folder)."""
    path = _check_exists(model_path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
        _check_exists(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def is_hf_tokenizer(model_path: str) -> bool:
    """True for a tokenizer.json file (any *.json) or a folder that holds tokenizer.json."""
    if os.path.isdir(model_path):
        return os.path.isfile(os.path.join(model_path, "tokenizer.json"))
    return model_path.lower().endswith(".json")


def _metadata_for(model_path: str, default: dict):
    """The metadata file beside the model when it is for this library, else an explicit dict."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    meta_path = os.path.join(folder, METADATA_FILE)
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("ignoring unreadable %s (%s)", meta_path, err)
            meta = {}
        if isinstance(meta, dict) and meta.get("library") == default["library"]:
            return meta_path
        logger.warning("ignoring %s: it is not for a %s model", meta_path, default["library"])
    return copy.deepcopy(default)


def _check_sentencepiece(model_path: str) -> None:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as err:
        raise ValueError(
            f"tokenizer model {model_path} is not a SentencePiece model ({err}); pass a .model "
            "file or a Hugging Face tokenizer.json"
        ) from None


def _build_hf(model_path: str, eos_token: Optional[str]):
    try:
        import transformers  # noqa: F401  (Megatron-Core's HF wrapper needs it)
    except ImportError:
        raise ValueError(
            f"tokenizer model {model_path} is a Hugging Face tokenizer but `transformers` is not "
            "installed; install megatron-ddk's `hf` extra or use a SentencePiece .model"
        ) from None
    from megatron.core.tokenizers import MegatronTokenizer

    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    if os.path.basename(model_path) not in ("tokenizer.json",) and not os.path.isdir(model_path):
        raise ValueError(f"tokenizer model {model_path}: a Hugging Face tokenizer file must be "
                         "named tokenizer.json (pass it or its folder)")
    kwargs = {"use_fast": True}
    if eos_token:
        kwargs["eos_token"] = eos_token
    # A local folder: transformers reads it without touching the network.
    tok = MegatronTokenizer.from_pretrained(
        tokenizer_path=folder, metadata_path=_metadata_for(folder, HF_METADATA), **kwargs
    )
    if tok.eod is None:
        vocab = set(tok.vocab)
        found = next((c for c in HF_EOS_CANDIDATES if c in vocab), None)
        if found is None:
            raise ValueError(
                f"tokenizer model {model_path} names no eos token and none of "
                f"{list(HF_EOS_CANDIDATES)} is in its vocabulary; pass eos_token explicitly"
            )
        tok.add_special_tokens({"eos_token": found})
    if tok.pad is None:
        # The usual HF convention (pad = eos). GPTDataset sees the collision and pads with -1,
        # which it masks out of the loss, so real EOD tokens are never masked as padding.
        tok.add_special_tokens({"pad_token": tok.vocab[tok.eod]})
    return tok


def build_tokenizer(model_path: str, eos_token: Optional[str] = None):
    """A Megatron-Core tokenizer for a SentencePiece .model or a Hugging Face tokenizer.json.

    The object has tokenize(text) -> ids, detokenize(ids) -> text, eod (= the model's eos id),
    pad, vocab_size and unique_identifiers, as GPTDatasetConfig needs. eos_token overrides the
    end-of-document token of a Hugging Face tokenizer.
    """
    path = _check_exists(model_path)
    if is_hf_tokenizer(path):
        tok = _build_hf(path, eos_token)
    else:
        _check_sentencepiece(path)
        from megatron.core.tokenizers import MegatronTokenizer

        tok = MegatronTokenizer.from_pretrained(
            tokenizer_path=path, metadata_path=_metadata_for(path, SP_METADATA)
        )
    eod = tok.eod
    if eod is None or eod < 0:
        raise ValueError(f"tokenizer model {model_path} has no end-of-sequence token (eos id "
                         f"{eod}); Megatron datasets need one to mark document ends")
    return tok


def _vocab_text(proto: bytes) -> str:
    """<prefix>.vocab as spm_train writes it: 'piece<TAB>score' per id."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                   for i in range(sp.get_piece_size()))


def write_tokenizer_metadata(model_path: str) -> str:
    """Write tokenizer_metadata.json beside a SentencePiece model (Megatron-Core's format)."""
    from megatron.core.tokenizers import MegatronTokenizer

    MegatronTokenizer.write_metadata(
        tokenizer_path=model_path, tokenizer_library=SP_METADATA["library"],
        model_type=SP_METADATA["model_type"], overwrite=True,
    )
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), METADATA_FILE)


def train_sentencepiece(
    sentences: Iterable[str],
    output_prefix: str,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
    lossless: bool = True,
    split_digits: bool = True,
    add_dummy_prefix: bool = False,
    character_coverage: float = 0.9995,
    num_threads: Optional[int] = None,
    max_sentence_bytes: int = 4096,
) -> str:
    """Train a SentencePiece model on `sentences`; write <prefix>.model, <prefix>.vocab and the
    folder's tokenizer_metadata.json (each under a temporary name, then renamed). Returns the
    .model path. Ids: unk=0, bos=1, eos=2 (= eod), pad=3, then user-defined symbols.

    lossless=True: identity normalisation, whitespace kept as is, byte fallback for characters
    outside the vocabulary, so decoding gives back the exact input text.
    """
    import sentencepiece

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type {model_type!r}: use 'bpe' or 'unigram'")
    folder = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(folder, exist_ok=True)
    options = dict(
        model_type=model_type, vocab_size=vocab_size,
        user_defined_symbols=list(user_defined_symbols),
        split_digits=split_digits, add_dummy_prefix=add_dummy_prefix,
        character_coverage=character_coverage, max_sentence_length=max_sentence_bytes,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    if lossless:
        options.update(normalization_rule_name="identity", remove_extra_whitespaces=False,
                       byte_fallback=True, allow_whitespace_only_pieces=True)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, **options)
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training for {output_prefix} failed: {err}. If the vocabulary is "
            "too large for the sample, lower --vocab-size or give more text"
        ) from None
    proto = model.getvalue()
    write_atomic(output_prefix + ".vocab", _vocab_text(proto))
    write_atomic(output_prefix + ".model", proto)  # last: the model marks a finished training
    write_tokenizer_metadata(output_prefix + ".model")
    logger.info("wrote %s.model (%s)", output_prefix, tokenizer_hash(output_prefix + ".model"))
    return output_prefix + ".model"


def parse_shares(spec: Optional[str], names: Sequence[str]) -> dict:
    """'name=0.5,other=0.25' -> normalised shares per domain; None/'' -> equal shares.
    Domains not named get share 0 (and are not sampled)."""
    if not spec:
        return {n: 1.0 / len(names) for n in names}
    shares = dict.fromkeys(names, 0.0)
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in shares:
            raise ValueError(f"--domain-shares item {item!r}: expected name=share with name one "
                             f"of {list(names)}")
        try:
            shares[name] = float(value)
        except ValueError:
            raise ValueError(f"--domain-shares item {item!r}: {value!r} is not a number") from None
        if shares[name] < 0:
            raise ValueError(f"--domain-shares item {item!r}: share must be >= 0")
    total = sum(shares.values())
    if total <= 0:
        raise ValueError(f"--domain-shares {spec!r}: shares sum to 0")
    return {n: s / total for n, s in shares.items()}


def sample_domains(domains, shares: dict, sample_bytes: int, seed: int = 1234,
                   json_key: str = "text", max_sentence_bytes: int = 4096,
                   skip_malformed: bool = False, progress: bool = False) -> list:
    """Lines sampled from each domain (megatron_ddk.data.preprocessing.corpus.DomainInput) with
    its share of sample_bytes, concatenated in domain order: the tokenizer's training text."""
    from megatron_ddk.data.preprocessing.corpus import sample_domain_text

    sentences = []
    iterator = domains
    if progress:
        from tqdm import tqdm

        iterator = tqdm(domains, desc="sampling domains", unit="domain")
    for i, domain in enumerate(iterator):
        budget = int(shares.get(domain.name, 0.0) * sample_bytes)
        if budget <= 0:
            continue
        part = sample_domain_text(domain.paths, budget, seed + i, json_key, max_sentence_bytes,
                                  skip_malformed)
        if not part:
            raise ValueError(f"domain {domain.name} ({domain.paths[0]}): no text to sample; the "
                             "domain is empty")
        logger.info("tokenizer sample: %s %d lines", domain.name, len(part))
        sentences.extend(part)
    return sentences
