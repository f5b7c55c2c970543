"""megatron_ddk.data.tokenizer: build, hash, lossless training, metadata, Hugging Face files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import sentencepiece

from megatron_ddk.data.tokenizer import (
    build_tokenizer,
    parse_shares,
    tokenizer_hash,
    train_sentencepiece,
)


def test_hash_is_sha256_of_file_bytes(tiny_tokenizer):
    with open(tiny_tokenizer, "rb") as f:
        expected = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    assert tokenizer_hash(tiny_tokenizer) == expected


def test_build_matches_raw_sentencepiece(tiny_tokenizer, samples):
    tok = build_tokenizer(tiny_tokenizer)
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    assert tok.eod == sp.eos_id() == 2
    assert tok.pad == sp.pad_id() == 3
    assert tok.vocab_size == sp.get_piece_size() == 800
    assert tok.unique_identifiers["tokenizer_path"] == os.path.abspath(tiny_tokenizer)
    for text in samples.values():
        assert tok.tokenize(text) == sp.encode(text)


@pytest.mark.parametrize("name", ["code", "cjk", "prose"])
def test_lossless_round_trip(tiny_tokenizer, samples, name):
    tok = build_tokenizer(tiny_tokenizer)
    text = samples[name]
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    assert 2 not in ids  # eos only where preprocessing appends it


def test_default_sentencepiece_is_not_lossless(tmp_path, samples):
    """The reason for lossless=True: SentencePiece's defaults collapse code whitespace."""
    lines = [ln for ln in (samples["code"] * 30 + samples["prose"] * 30).split("\n") if ln]
    model = train_sentencepiece(lines, str(tmp_path / "lossy"), vocab_size=120, lossless=False,
                                num_threads=1)
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    assert sp.decode(sp.encode(samples["code"])) != samples["code"]


def test_training_writes_files_megatron_loads(tiny_tokenizer):
    folder = os.path.dirname(tiny_tokenizer)
    assert os.path.isfile(tiny_tokenizer[:-len(".model")] + ".vocab")
    with open(os.path.join(folder, "tokenizer_metadata.json")) as f:
        meta = json.load(f)
    assert meta["library"] == "sentencepiece"
    from megatron.core.tokenizers import MegatronTokenizer

    tok = MegatronTokenizer.from_pretrained(tokenizer_path=tiny_tokenizer)  # reads the json
    assert tok.eod == 2
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_released_model_without_metadata_writes_nothing(tiny_tokenizer, tmp_path):
    """A released tokenizer.model (no metadata beside it) loads with explicit metadata."""
    folder = tmp_path / "released"
    folder.mkdir()
    shutil.copy(tiny_tokenizer, folder / "tokenizer.model")
    before = sorted(os.listdir(folder))
    tok = build_tokenizer(str(folder / "tokenizer.model"))
    assert tok.eod == 2 and tok.tokenize("x = 1") == sentencepiece.SentencePieceProcessor(
        model_file=str(folder / "tokenizer.model")).encode("x = 1")
    assert sorted(os.listdir(folder)) == before


def test_user_defined_symbols_are_single_tokens(tmp_path, samples):
    lines = [ln for ln in (samples["code"] * 20 + samples["prose"] * 20).split("\n") if ln]
    model = train_sentencepiece(lines, str(tmp_path / "uds"), vocab_size=330,
                                user_defined_symbols=["<|im_start|>"], num_threads=1)
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    ids = sp.encode("a<|im_start|>b")
    assert sp.piece_to_id("<|im_start|>") in ids
    assert sp.decode(ids) == "a<|im_start|>b"


def test_missing_model_error_names_path(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="nope.model.*does not exist"):
        build_tokenizer(missing)
    with pytest.raises(ValueError, match="nope.model"):
        tokenizer_hash(missing)


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="bad.model is not a SentencePiece model"):
        build_tokenizer(str(bad))


def test_hugging_face_tokenizer_json(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["def f(x):\n    return x  # ok", "hello world 中文"] * 50, trainer)
    (tmp_path / "hf").mkdir()
    path = str(tmp_path / "hf" / "tokenizer.json")
    hf.save(path)
    tok = build_tokenizer(path)
    assert tok.eod == hf.token_to_id("</s>")  # found among the usual eos names
    assert tok.pad == tok.eod and tok.vocab_size == hf.get_vocab_size()
    text = "def f(x):\n    return x  # 中文"
    assert tok.tokenize(text) == hf.encode(text).ids
    assert tok.detokenize(tok.tokenize(text)) == text


def test_parse_shares():
    assert parse_shares(None, ["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert parse_shares("a=3,b=1", ["a", "b", "c"]) == {"a": 0.75, "b": 0.25, "c": 0.0}
    with pytest.raises(ValueError, match="'z=1'"):
        parse_shares("z=1", ["a"])
    with pytest.raises(ValueError, match="sum to 0"):
        parse_shares("a=0", ["a"])
