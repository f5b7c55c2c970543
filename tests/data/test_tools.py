"""The command-line tools as users run them: --help, preprocess_data.py naming and worker
independence, and the one-command demo (scripts/preprocess_domains.sh --demo)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOOLS = ["train_tokenizer.py", "preprocess_data.py", "build_demo_corpus.py", "build_domains.py"]


def _run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("tool", TOOLS)
def test_help(tool):
    res = _run([sys.executable, f"tools/{tool}", "--help"])
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


def test_preprocess_data_cli(tmp_path, tiny_tokenizer, make_jsonl, make_texts):
    from megatron_ddk.data.preprocessing.build import tokenize_to_datasets

    src = make_jsonl(tmp_path / "in.jsonl", make_texts(300, seed=9))
    res = _run([sys.executable, "tools/preprocess_data.py", "--input", src, "--output-prefix",
                str(tmp_path / "cli"), "--tokenizer-model", tiny_tokenizer, "--workers", "2",
                "--append-eod"])
    assert res.returncode == 0, res.stderr
    assert "300 documents" in res.stdout
    ref = str(tmp_path / "ref")
    tokenize_to_datasets([src], {"text": ref}, tiny_tokenizer, workers=1)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(str(tmp_path / "cli_text_document") + suffix, ref + suffix,
                           shallow=False)
    bad = _run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "no.jsonl"),
                "--output-prefix", str(tmp_path / "x"), "--tokenizer-model", tiny_tokenizer])
    assert bad.returncode != 0 and "no.jsonl does not exist" in bad.stderr


def _check_exact_decoding(manifest, corpus, max_piece_bytes: int = 1024) -> None:
    """Nothing is lost or invented: every held-out document decodes to one piece of a corpus
    text (at most max_piece_bytes), every training document to a run of one text, and together
    they hold exactly the corpus's characters."""
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = sentencepiece.SentencePieceProcessor(model_file=manifest.tokenizer_model)
    for d in manifest.domains:
        with open(corpus / f"{d.name}.jsonl", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        total = 0
        for prefix in d.train_prefixes + [d.valid_prefix, d.test_prefix]:
            ds = IndexedDataset(prefix)
            for i in range(len(ds)):
                ids = ds[i].tolist()
                assert ids[-1] == sp.eos_id() and sp.eos_id() not in ids[:-1]
                text = sp.decode(ids[:-1])
                assert any(text in t for t in texts), (d.name, text[:80])
                if prefix != d.train_prefixes[0]:
                    assert len(text.encode("utf-8")) <= max_piece_bytes
                total += len(text)
        assert total == sum(len(t) for t in texts), d.name


def test_demo_one_command_and_validation_too_large(tmp_path):
    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.tokenizer import tokenizer_hash

    env = dict(os.environ, PYTHON=sys.executable, DEMO_MAX_MB="0.32", VOCAB_SIZE="1000",
               VALID_SAMPLES="4", VALID_SEQ_LENGTH="64")
    demo = tmp_path / "demo"
    res = _run(["bash", "scripts/preprocess_domains.sh", "--demo", str(demo), "--workers", "2",
                "--min-heldout-documents", "1"], env=env)  # 4 x 65-token sets: a floor of 1
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = load_manifest(str(demo / "datasets" / "manifest.yaml"))
    assert len(manifest.domains) >= 4
    model = str(demo / "tokenizer" / "ddk.model")
    assert manifest.tokenizer_hash == tokenizer_hash(model) and manifest.vocab_size == 1000
    assert all(d.num_valid_tokens >= 4 * 65 for d in manifest.domains)
    assert all(d.num_test_tokens >= 4 * 65 for d in manifest.domains)  # test follows valid
    raw = yaml.safe_load(open(demo / "datasets" / "manifest.yaml"))  # relocatable: relative
    assert raw["tokenizer"]["model"] == "../tokenizer/ddk.model"
    assert raw["domains"][0]["valid_prefix"] == f"{raw['domains'][0]['name']}/valid_text_document"
    _check_exact_decoding(manifest, demo / "corpus")

    res = _run([sys.executable, "tools/build_domains.py", "--input", str(demo / "corpus"),
                "--output-dir", str(tmp_path / "big"), "--tokenizer-model", model,
                "--domains", "licenses", "--valid-seq-length", "4096"])
    assert res.returncode != 0
    assert ("domain licenses: the held-out sets need valid 500 x 4097 + test 500 x 4097 = "
            "4097000 tokens but its") in res.stderr  # from the file sizes, before tokenizing
    assert not os.path.exists(tmp_path / "big" / "manifest.yaml")
