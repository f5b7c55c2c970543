"""tools/preprocess_data.py as a drop-in for Megatron-LM's: a Megatron-LM command line runs
unchanged and writes the files Megatron-LM would (checked against a plain loop over Megatron-Core's
IndexedDatasetBuilder with the same tokenizer), every flag is accepted (inert ones change
nothing), each supported tokenizer type gives Megatron-LM's ids (GPT-2 BPE against a pure-Python
restatement of GPT-2's BPE; a Hugging Face folder against Megatron-Core's own wrapper), and what
is not supported is refused with a message -- never argparse's "unrecognized".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sentencepiece

from tests.data.test_preprocess_engine import megatron_reference, same_files

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _tool():
    from megatron_ddk.commands import preprocess_data

    return preprocess_data


def _run_main(argv):
    """Run the command in-process; returns its error line ('' on success)."""
    try:
        _tool().main(argv)
    except ValueError as err:  # `error: ...`, exit 2 (cli.run_tool)
        return f"error: {err}"
    return ""


@pytest.fixture
def corpus(tmp_path, make_texts):
    texts = make_texts(30, seed=21)
    texts[3] = ""  # Megatron-LM writes an empty document for it
    path = tmp_path / "in.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}, ensure_ascii=False) + "\n")
    return str(path)


def _sp_reference(tmp_path, corpus, model, name="ref", append_eod=True, bos=False):
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    tokenize = (lambda t: [sp.bos_id()] + sp.encode(t)) if bos else sp.encode
    return megatron_reference(corpus, str(tmp_path / name), ["text"], tokenize, sp.eos_id(),
                              sp.get_piece_size(), append_eod=append_eod)["text"]


def test_megatron_command_line_runs_unchanged(tmp_path, corpus, tiny_tokenizer):
    out = str(tmp_path / "mlm")
    res = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", out,
         "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tiny_tokenizer,
         "--json-keys", "text", "--append-eod", "--workers", "2", "--partitions", "1",
         "--log-interval", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert same_files(out + "_text_document", _sp_reference(tmp_path, corpus, tiny_tokenizer))
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Processed ")]
    assert [ln.split(" (")[0] for ln in lines] == [f"Processed {n} documents" for n in (10, 20, 30)]
    assert all(ln.endswith(" MB/s).") and " docs/s, " in ln for ln in lines)
    assert "30 documents" in res.stdout


def test_every_inert_flag_is_accepted_and_changes_nothing(tmp_path, corpus, tiny_tokenizer):
    """Flags that do not apply to a SentencePiece GPT tokenizer, as Megatron-LM ignores them."""
    out = str(tmp_path / "all")
    msg = _run_main([
        "--input", corpus, "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", tiny_tokenizer, "--append-eod", "--workers", "1",
        "--vocab-size", "100", "--padded-vocab-size", "1024", "--vocab-extra-ids", "0",
        "--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "10",
        "--tiktoken-special-tokens", "<unk>", "--tokenizer-sentencepiece-legacy",
        "--tokenizer-hf-use-fast", "--tokenizer-hf-include-special-tokens",
        "--trust-remote-code", "--keep-newlines", "--lang", "german", "--log-interval", "7",
        "--keep-sequential-samples", "--tokenizer-metadata",
        os.path.join(os.path.dirname(tiny_tokenizer), "tokenizer_metadata.json")])
    assert msg == ""
    assert same_files(out + "_text_document", _sp_reference(tmp_path, corpus, tiny_tokenizer))


@pytest.mark.parametrize("kind,legacy,bos", [
    ("Llama2Tokenizer", False, False), ("Llama2Tokenizer", True, True),
    ("GPTSentencePieceTokenizer", True, False)])
def test_sentencepiece_types(tmp_path, corpus, tiny_tokenizer, kind, legacy, bos):
    out = str(tmp_path / "o")
    argv = ["--input", corpus, "--output-prefix", out, "--tokenizer-type", kind,
            "--tokenizer-model", tiny_tokenizer, "--workers", "2", "--partitions", "2"]
    assert _run_main(argv + ["--append-eod"] + (["--legacy-tokenizer"] if legacy else [])) == ""
    n = 30
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    tokenize = (lambda t: [sp.bos_id()] + sp.encode(t)) if bos else sp.encode
    rr = [i for p in range(2) for i in range(n) if i % 2 == p]  # Megatron-LM's partition order
    ref = megatron_reference(corpus, str(tmp_path / "ref"), ["text"], tokenize, sp.eos_id(),
                             sp.get_piece_size(), order=rr)
    assert same_files(out + "_text_document", ref["text"])


def test_default_is_no_eod_and_type_from_the_model_file(tmp_path, corpus, tiny_tokenizer):
    out = str(tmp_path / "o")
    assert _run_main(["--input", corpus, "--output-prefix", out, "--tokenizer-model",
                      tiny_tokenizer, "--workers", "1"]) == ""
    ref = _sp_reference(tmp_path, corpus, tiny_tokenizer, append_eod=False)
    assert same_files(out + "_text_document", ref)


def _gpt2_reference(vocab_file, merges_file):
    """GPT-2's byte-level BPE restated in Python (the algorithm of OpenAI's encoder.py)."""
    import regex

    with open(vocab_file, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
        merges = [tuple(ln.split()) for ln in f.read().split("\n")
                  if ln and not ln.startswith("#version")]
    ranks = {pair: i for i, pair in enumerate(merges)}
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    byte_chars = {b: chr(c) for b, c in zip(bs, cs)}
    pattern = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(parts):
        while len(parts) > 1:
            rank, pair = min((ranks.get(p, float("inf")), p) for p in zip(parts, parts[1:]))
            if rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def tokenize(text):
        return [encoder[p] for word in pattern.findall(text)
                for p in bpe(list("".join(byte_chars[b] for b in word.encode("utf-8"))))]

    return tokenize, encoder["<|endoftext|>"], len(encoder)


def test_gpt2_bpe_from_vocab_and_merge_files(tmp_path, corpus, make_texts):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(make_texts(60, seed=5), vocab_size=420, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    vocab, merges = bpe.save_model(str(folder))
    out = str(tmp_path / "o")
    assert _run_main(["--input", corpus, "--output-prefix", out, "--tokenizer-type",
                      "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
                      "--append-eod", "--workers", "2"]) == ""
    tokenize, eod, size = _gpt2_reference(vocab, merges)
    ref = megatron_reference(corpus, str(tmp_path / "ref"), ["text"], tokenize, eod, size)
    assert same_files(out + "_text_document", ref["text"])


def test_huggingface_local_folder(tmp_path, corpus, make_texts):
    from megatron.core.tokenizers import MegatronTokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(make_texts(60, seed=6), trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = str(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    out = str(tmp_path / "o")
    assert _run_main(["--input", corpus, "--output-prefix", out, "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", folder, "--append-eod",
                      "--workers", "2"]) == ""
    # Megatron-LM's path: Megatron-Core's wrapper with build_tokenizer's arguments, text by text
    ref_tok = MegatronTokenizer.from_pretrained(
        tokenizer_path=folder, metadata_path={"library": "huggingface"}, vocab_file=None,
        merges_file=None, additional_special_tokens=[], use_fast=False,
        trust_remote_code=False, include_special_tokens=False)
    ref = megatron_reference(corpus, str(tmp_path / "ref"), ["text"], ref_tok.tokenize,
                             ref_tok.eod, ref_tok.vocab_size)
    assert same_files(out + "_text_document", ref["text"])


@pytest.mark.parametrize("extra,message", [
    (["--tokenizer-type", "TikTokenizer"], "TikTokenizer is not supported"),
    (["--tokenizer-type", "BertWordPieceCase"], "BertWordPieceCase is not supported"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--legacy-tokenizer"],
     "--legacy-tokenizer with SentencePieceTokenizer .* is not supported"),
    (["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-special-tokens", "<x>"],
     "--tokenizer-special-tokens is supported with HuggingFaceTokenizer only"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "GPT2BPETokenizer needs --vocab-file"),
    (["--workers", "0"], r"--workers \(0\) .* must be >= 1"),
    (["--split-sentences"], r"--split-sentences needs nltk .*pip install nltk.*punkt"),
])
def test_refused_with_a_message(tmp_path, corpus, tiny_tokenizer, monkeypatch, extra, message):
    import re

    monkeypatch.setitem(sys.modules, "nltk", None)  # nltk absent, even where it is installed
    argv = ["--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-model",
            tiny_tokenizer, "--workers", "1"] + extra
    msg = _run_main(argv)
    assert re.search(message, msg), msg
    assert "unrecognized" not in msg
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]  # nothing written


def test_sentencepiece_path_imports_no_torch(tmp_path, corpus, tiny_tokenizer):
    """Fast start-up: tokenizing with a SentencePiece model never imports torch/megatron.core."""
    code = ("import sys\n"
            "from megatron_ddk.cli import main\n"
            f"assert main(['preprocess', '--input', {corpus!r}, '--output-prefix', "
            f"{str(tmp_path / 'o')!r}, '--tokenizer-type', 'Llama2Tokenizer', "
            f"'--tokenizer-model', {tiny_tokenizer!r}, '--append-eod', '--workers', '2']) == 0\n"
            "print('heavy:', sorted(m for m in ('torch', 'megatron.core', 'transformers') "
            "if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "heavy: []" in res.stdout
