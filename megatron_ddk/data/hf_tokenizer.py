"""The tokenizer files of a Hugging Face export: from the project's tokenizer to a folder that
transformers' AutoTokenizer loads with the same ids.

- resolve_tokenizer(path): what a tokenizer path is: a SentencePiece model under any file name
  (or a folder holding tokenizer.model or exactly one *.model), a Hugging Face tokenizer.json,
  or a folder of Hugging Face tokenizer files.
- write_hf_tokenizer(source, out, expected_hash): checks the file against the hash a checkpoint
  recorded, then writes
    SentencePiece: tokenizer.model (the model's bytes) + tokenizer_config.json
      (tokenizer_class LlamaTokenizer, bos/eos/unk/pad pieces of the model, add_bos_token,
      add_prefix_space = the model's add_dummy_prefix, legacy false) + special_tokens_map.json;
    Hugging Face: the folder's tokenizer files as they are.
  Returns the special-token ids (for config.json and generation_config.json).
- verify_hf_tokenizer(out, source): loads `out` with AutoTokenizer and compares its ids with the
  SentencePiece model's on sample text (with and without bos); a mismatch is an error, so an
  export never silently tokenizes differently from training.

Imports sentencepiece (and transformers, only to verify) lazily; of megatron_ddk only
data.tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_ddk.data.tokenizer import tokenizer_hash

logger = logging.getLogger(__name__)

HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      "chat_template.jinja")
"""Files of a Hugging Face tokenizer folder, copied as they are."""

SAMPLE_TEXTS = (
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs,\n\nblank lines   and trailing spaces  ",
    "def square(x):\n    return x ** 2  # 12345 67.89\n",
    "中文文本测试，你好世界。日本語のテキスト。한국어 텍스트.",
    "Ünïcödé àccents, ß, œ, emoji 😀🚀 and symbols ∑∫√≈ ©®",
    " x", "x ", "\n", "a",
)
"""Text the export's tokenizer must tokenize exactly as the project's tokenizer does."""


TOKENIZER_MODEL_FILES = ("tokenizer.model", "tokenizer.json")
"""The file of a Hugging Face folder that identifies its tokenizer, in order of preference: the
one `megatron-ddk convert-hf` records the hash of and preprocessing uses."""


def hf_tokenizer_file(folder: str) -> Optional[str]:
    """The tokenizer file of a Hugging Face model folder (TOKENIZER_MODEL_FILES), or None."""
    for name in TOKENIZER_MODEL_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


@dataclass
class TokenizerSource:
    """A tokenizer to export."""

    kind: str
    """'sentencepiece' or 'hf'."""

    model_file: str
    """The file whose hash checkpoints record (.model, or tokenizer.json)."""

    folder: Optional[str] = None
    """For 'hf': the folder whose tokenizer files are copied."""


def resolve_tokenizer(path: str) -> TokenizerSource:
    """Classify a tokenizer path (see the module docstring); ValueError when it is none."""
    if not os.path.exists(path):
        raise ValueError(f"tokenizer {path} does not exist")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return TokenizerSource("hf", os.path.join(path, "tokenizer.json"), path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
                return TokenizerSource("hf", os.path.join(path, "tokenizer.model"), path)
            return _sentencepiece(os.path.join(path, "tokenizer.model"))
        models = sorted(n for n in os.listdir(path) if n.endswith(".model"))
        if len(models) == 1:
            return _sentencepiece(os.path.join(path, models[0]))
        raise ValueError(f"tokenizer folder {path} holds no tokenizer.json, no tokenizer.model "
                         f"and {'several' if models else 'no'} *.model files ({models}); pass "
                         f"the tokenizer file itself")
    if path.lower().endswith(".json"):
        return TokenizerSource("hf", path, os.path.dirname(path))
    return _sentencepiece(path)


def _sentencepiece(path: str) -> TokenizerSource:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"tokenizer {path} is neither a SentencePiece model ({err}) nor a "
                         f"Hugging Face tokenizer.json") from None
    return TokenizerSource("sentencepiece", path)


def check_hash(source: TokenizerSource, expected: Optional[str]) -> str:
    """The source's hash; ValueError when it is not `expected` (the checkpoint's)."""
    candidates = [source.model_file]
    if source.kind == "hf":  # a LLaMA folder ships both; checkpoints hash either
        candidates += [os.path.join(source.folder, n) for n in ("tokenizer.json", "tokenizer.model")
                       if os.path.isfile(os.path.join(source.folder, n))]
    found = {tokenizer_hash(p): p for p in candidates}
    if expected is None:
        return tokenizer_hash(source.model_file)
    if expected not in found:
        raise ValueError(f"tokenizer {source.model_file} has hash "
                         f"{', '.join(sorted(found))} but the checkpoint was trained with "
                         f"{expected}; pass the tokenizer the checkpoint was trained with")
    return expected


def _sp_special(sp) -> Dict[str, Optional[int]]:
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    ids = {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}
    if ids["pad"] is None:  # the usual HF convention; lm-eval needs a pad token to batch
        ids["pad"] = ids["eos"]
    return ids


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def _write_sentencepiece(model_file: str, out: str, add_bos_token: bool) -> Dict[str, int]:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    ids = _sp_special(sp)
    if ids["eos"] is None:
        raise ValueError(f"tokenizer {model_file} has no eos piece; generation and lm-eval need "
                         "one")
    tokens = {f"{k}_token": sp.IdToPiece(v) for k, v in ids.items() if v is not None}
    shutil.copyfile(model_file, os.path.join(out, "tokenizer.model"))
    _write_json(os.path.join(out, "tokenizer_config.json"), dict(
        tokens, tokenizer_class="LlamaTokenizer", add_bos_token=bool(add_bos_token),
        add_eos_token=False, add_prefix_space=bool(proto.normalizer_spec.add_dummy_prefix),
        legacy=False, clean_up_tokenization_spaces=False))
    _write_json(os.path.join(out, "special_tokens_map.json"), tokens)
    return {f"{k}_token_id": v for k, v in ids.items() if v is not None}


def _hf_token_id(folder: str, token) -> Optional[int]:
    """Id of a special token (string or {'content': ...}) in a Hugging Face tokenizer folder."""
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            data = json.load(f)
        for t in data.get("added_tokens") or []:
            if t.get("content") == token:
                return int(t["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    sp_path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(sp_path):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=sp_path)
        pid = sp.PieceToId(token)
        return pid if sp.IdToPiece(pid) == token else None
    return None


def copy_tokenizer_files(folder: str, out: str, tokenizer_json: Optional[str] = None
                         ) -> List[str]:
    """Copy the HF_TOKENIZER_FILES present in `folder` into `out` (created when something is
    copied); `tokenizer_json` is a tokenizer.json under another name. Returns the names copied."""
    copied = []
    for name in HF_TOKENIZER_FILES:
        src = os.path.join(folder, name)
        if name == "tokenizer.json" and tokenizer_json:
            src = tokenizer_json
        if os.path.isfile(src):
            os.makedirs(out, exist_ok=True)
            shutil.copyfile(src, os.path.join(out, name))
            copied.append(name)
    return copied


def _copy_hf(source: TokenizerSource, out: str) -> Dict[str, int]:
    json_file = source.model_file if source.model_file.endswith(".json") else None
    copy_tokenizer_files(source.folder, out, json_file)
    config = os.path.join(out, "tokenizer_config.json")
    if not os.path.isfile(config):
        raise ValueError(f"tokenizer {source.model_file}: the folder has no "
                         f"tokenizer_config.json (which names the bos/eos tokens); add one")
    with open(config, encoding="utf-8") as f:
        tc = json.load(f)
    ids = {f"{k}_id": _hf_token_id(out, tc.get(k))
           for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {k: v for k, v in ids.items() if v is not None}


def write_hf_tokenizer(source: TokenizerSource, out: str, expected_hash: Optional[str],
                       add_bos_token: bool = False) -> Dict[str, int]:
    """Write the tokenizer files into `out` (see the module docstring); returns
    {'bos_token_id', 'eos_token_id', 'unk_token_id', 'pad_token_id'} (those that exist)."""
    check_hash(source, expected_hash)
    if source.kind == "sentencepiece":
        return _write_sentencepiece(source.model_file, out, add_bos_token)
    return _copy_hf(source, out)


def tokenizer_size(folder: str) -> Optional[int]:
    """Largest token id + 1 of the folder's tokenizer (None when it has none readable)."""
    ids: List[int] = []
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            data = json.load(f)
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids += list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in data.get("added_tokens") or []]
    elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(
            model_file=os.path.join(folder, "tokenizer.model"))
        ids.append(sp.GetPieceSize() - 1)
    tc = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tc):
        with open(tc, encoding="utf-8") as f:
            ids += [int(k) for k in (json.load(f).get("added_tokens_decoder") or {})]
    return max(ids) + 1 if ids else None


def verify_hf_tokenizer(out: str, source: TokenizerSource,
                        texts: Iterable[str] = SAMPLE_TEXTS) -> int:
    """AutoTokenizer(out) must give the SentencePiece model's ids on `texts` (with and without
    bos); returns the number of texts checked (0 when there is nothing to compare)."""
    if source.kind != "sentencepiece":
        return 0  # the Hugging Face files are copied as they are
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=source.model_file)
    tok = AutoTokenizer.from_pretrained(out)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        bos = [sp.bos_id()] if json.load(f).get("add_bos_token") else []
    checked = 0
    for text in texts:
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False)
        with_bos = tok.encode(text)
        if got != want or with_bos != bos + want:
            raise ValueError(f"the exported tokenizer in {out} ({type(tok).__name__}) does not "
                             f"reproduce {source.model_file} on {text[:40]!r}: {got[:12]} vs "
                             f"{want[:12]} (with special tokens: {with_bos[:12]}); this "
                             f"SentencePiece model's normalisation has no transformers "
                             f"equivalent: export a tokenizer.json instead")
        checked += 1
    return checked


def sample_texts(extra: Sequence[str] = ()) -> List[str]:
    """SAMPLE_TEXTS plus caller-given text (e.g. a few held-out documents)."""
    return list(SAMPLE_TEXTS) + [t for t in extra if t]
