"""`megatron-ddk build-domains` rebuilds through a staging folder: a rebuild that fails part-way (a
malformed line in the second domain, a bad tokenizer path, a rename failing in the swap) leaves
the previous manifest and every dataset byte for byte; a killed build's staging folder is
removed by the next one; a rebuild that succeeds replaces the files (and the stale index
caches). The tool runs in this process (its main(), as from the command line)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def build_domains():
    from megatron_ddk.commands import build_domains

    return build_domains


def _snapshot(folder) -> dict:
    """Every file under folder -> its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture
def corpus(tmp_path, make_jsonl, make_texts):
    folder = tmp_path / "corpus"
    folder.mkdir()
    make_jsonl(folder / "alpha.jsonl", make_texts(30, seed=1))
    make_jsonl(folder / "beta.jsonl", make_texts(30, seed=2))
    return folder


def _argv(corpus, out, tokenizer, *extra):
    return ["--input", str(corpus), "--output-dir", str(out), "--tokenizer-model", tokenizer,
            "--valid-samples", "2", "--valid-seq-length", "16", "--workers", "1",
            "--min-heldout-documents", "1", *extra]


def test_failed_rebuild_keeps_the_previous_build(tmp_path, corpus, tiny_tokenizer,
                                                  build_domains, make_jsonl, make_texts,
                                                  monkeypatch):
    from megatron_ddk.data.manifest import load_manifest

    out = tmp_path / "datasets"
    build_domains.main(_argv(corpus, out, tiny_tokenizer))
    (out / "cache").mkdir()  # as a training run leaves it
    (out / "cache" / "index.npy").write_bytes(b"old")
    before = _snapshot(out)
    assert {"manifest.yaml", "alpha/train_text_document.bin", "beta/test_text_document.idx",
            "cache/index.npy"} <= set(before)

    # 1. a malformed line in the second domain, found after the first domain was tokenized
    with open(corpus / "beta.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"beta\.jsonl:31: invalid JSON"):
        build_domains.main(_argv(corpus, out, tiny_tokenizer))
    assert _snapshot(out) == before
    # 2. a tokenizer path that does not exist
    with pytest.raises(ValueError, match="absent.model"):
        build_domains.main(_argv(corpus, out, str(tmp_path / "absent.model"),
                                 "--skip-malformed"))
    assert _snapshot(out) == before
    # 3. a rename failing half-way through the swap: every old file is put back
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        if ".staging-" in str(src) and ".staging-" not in str(dst):  # staged file into place
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(28, "No space left on device", dst)
        real_replace(src, dst)

    make_jsonl(corpus / "alpha.jsonl", make_texts(40, seed=7))  # different data
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        build_domains.build(build_domains._parse_args(
            _argv(corpus, out, tiny_tokenizer, "--skip-malformed")))
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) > 3 and _snapshot(out) == before  # the fault, then the roll-back
    assert not [n for n in os.listdir(out) if n.startswith(".staging")]

    # 4. a killed build's staging folder goes; a rebuild that succeeds replaces everything
    (out / ".staging-999999999" / "alpha").mkdir(parents=True)
    (out / ".staging-999999999" / "alpha" / "x.bin").write_bytes(b"junk")
    build_domains.main(_argv(corpus, out, tiny_tokenizer, "--skip-malformed"))
    after = _snapshot(out)
    assert sorted(os.listdir(out)) == ["alpha", "beta", "manifest.yaml"]  # stale cache gone
    assert after["manifest.yaml"] != before["manifest.yaml"]
    assert after["alpha/train_text_document.bin"] != before["alpha/train_text_document.bin"]
    m = load_manifest(str(out / "manifest.yaml"))
    assert m.domains[0].train_prefixes == [str(out / "alpha" / "train_text_document")]
    assert m.domains[0].num_train_documents + m.domains[0].num_valid_documents \
        + m.domains[0].num_test_documents == 40


def test_rebuild_without_test_split_removes_the_old_one(tmp_path, corpus, tiny_tokenizer,
                                                        build_domains):
    out = tmp_path / "datasets"
    build_domains.main(_argv(corpus, out, tiny_tokenizer))
    assert (out / "alpha" / "test_text_document.bin").exists()
    build_domains.main(_argv(corpus, out, tiny_tokenizer, "--test-samples", "0"))
    assert sorted(os.listdir(out / "alpha")) == [  # the old test set and its record are gone
        f"{split}_text_document{suffix}" for split in ("train", "valid")
        for suffix in (".bin", ".idx", ".tokenizer.json")]


def test_dry_run_and_trained_tokenizer_are_staged(tmp_path, corpus, build_domains):
    """--train-tokenizer trains into the staging folder: a dry run leaves nothing, a real build
    moves the tokenizer to --tokenizer-model and the manifest names it there."""
    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.tokenizer import tokenizer_hash

    out, tok = tmp_path / "datasets", tmp_path / "tok" / "ddk.model"
    extra = ["--train-tokenizer", "--vocab-size", "500", "--sample-mb", "1"]
    build_domains.main(_argv(corpus, out, str(tok), "--dry-run", *extra))
    assert os.listdir(out) == [] and not tok.parent.exists()
    build_domains.main(_argv(corpus, out, str(tok), *extra))
    assert sorted(os.listdir(tok.parent)) == ["ddk.model", "ddk.vocab", "tokenizer_metadata.json"]
    m = load_manifest(str(out / "manifest.yaml"))
    assert m.tokenizer_model == str(tok) and m.tokenizer_hash == tokenizer_hash(str(tok))


def test_every_dataset_records_its_tokenizer_and_another_is_refused_by_name(
        tmp_path, corpus, tiny_tokenizer, build_domains):
    """A manifest edited to name a new tokenizer (hash and vocabulary size updated) over
    datasets built with the old one is refused when loaded, naming the dataset."""
    import json

    import yaml

    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.tokenizer import tokenizer_hash, train_sentencepiece

    out = tmp_path / "out"
    build_domains.main(_argv(corpus, out, tiny_tokenizer))
    manifest = load_manifest(str(out / "manifest.yaml"))
    for d in manifest.domains:
        for prefix in d.train_prefixes + [d.valid_prefix, d.test_prefix]:
            with open(prefix + ".tokenizer.json") as f:
                assert json.load(f) == {"tokenizer_hash": tokenizer_hash(tiny_tokenizer),
                                        "vocab_size": 800}
    other = train_sentencepiece(["lorem ipsum dolor sit amet, consectetur adipiscing"] * 200,
                                str(tmp_path / "other"), vocab_size=300, num_threads=1)
    raw = yaml.safe_load(open(out / "manifest.yaml"))
    raw["tokenizer"].update(model=other, hash=tokenizer_hash(other), vocab_size=300)
    with open(out / "manifest.yaml", "w") as f:
        yaml.safe_dump(raw, f)
    with pytest.raises(ValueError, match=r"dataset .*alpha.* was built with tokenizer "
                                         r"sha256:\w+ \(vocabulary 800\) but the manifest names "
                                         r"sha256:\w+ \(vocabulary 300\)"):
        load_manifest(str(out / "manifest.yaml"))


def test_sigkill_in_the_middle_of_the_final_swap_is_rolled_back(tmp_path, corpus,
                                                                tiny_tokenizer, build_domains,
                                                                make_jsonl, make_texts):
    """A rebuild SIGKILLed after it moved the old manifest and some datasets aside leaves no
    manifest; the next run's clean-up reads the swap journal and puts the previous build back
    byte for byte (then a rebuild succeeds)."""
    import subprocess
    import sys

    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.preprocessing.build import remove_stale_staging

    out = tmp_path / "out"
    build_domains.main(_argv(corpus, out, tiny_tokenizer))
    before = _snapshot(out)
    make_jsonl(corpus / "alpha.jsonl", make_texts(40, seed=9))  # a different rebuild
    code = (
        "import os, signal, sys\n"
        "from megatron_ddk.data.preprocessing import build\n"
        "real, calls = os.replace, []\n"
        "def replace(src, dst):\n"
        "    if '.staging-' in str(src) and '.previous' not in str(src) and\\\n"
        "            '.staging-' not in str(dst):\n"
        "        calls.append(dst)\n"
        "        if len(calls) == 3:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "build.os.replace = replace\n"
        "from megatron_ddk.commands import build_domains\n"
        f"build_domains.main({_argv(corpus, out, tiny_tokenizer)!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (out / "manifest.yaml").exists()  # what the kill left
    assert remove_stale_staging(str(out))
    assert _snapshot(out) == before
    build_domains.main(_argv(corpus, out, tiny_tokenizer))
    assert load_manifest(str(out / "manifest.yaml")).domains[0].num_train_documents > 0
