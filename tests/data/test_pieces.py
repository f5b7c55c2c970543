"""Cutting long documents into pieces (data/preprocessing/pieces.py), the source-spread held-out
draw and the document floor (data/preprocessing/heldout.py), and build_domains on a corpus of a
few very long documents."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from megatron_ddk.data.preprocessing.heldout import (
    HeldOutSpec,
    check_domains,
    draw_order,
    plan_split,
)
from megatron_ddk.data.preprocessing.pieces import split_document
from megatron_ddk.testing import tiny_run


def _random_text(rng: random.Random, num_lines: int) -> str:
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "\u4e2d\u6587", "x" * 30]
    lines = []
    for _ in range(num_lines):
        if rng.random() < 0.15:
            lines.append("")  # paragraph break
        else:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))))
    return "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")


@pytest.mark.parametrize("seed", range(8))
def test_split_document_is_lossless_and_bounded(seed):
    rng = random.Random(seed)
    text = _random_text(rng, 300)
    for max_bytes in (1, 7, 64, 500, 4096):
        pieces = split_document(text, max_bytes)
        assert "".join(pieces) == text
        assert all(p and len(p.encode("utf-8")) <= max(max_bytes, 3) for p in pieces)
        longest = max(len(line.encode("utf-8")) for line in text.splitlines(keepends=True))
        if longest <= max_bytes:  # lines fit: every cut is at a line end
            assert all(p.endswith("\n") for p in pieces[:-1])


def test_split_document_prefers_paragraph_breaks():
    para = "word " * 30 + "\n"  # 151 bytes a line
    text = (para * 3 + "\n") * 6  # paragraphs of 3 lines + a blank line (454 bytes)
    pieces = split_document(text, 700)
    assert "".join(pieces) == text
    # the greedy cut would close after 4 lines (604 bytes); the paragraph break is preferred
    assert all(p.endswith("\n\n") for p in pieces[:-1])
    assert split_document("short", 700) == ["short"]
    assert split_document(text, 0) == [text]  # 0: never cut


def test_split_document_long_line_is_cut_at_whitespace():
    line = " ".join(f"w{i:03d}" for i in range(200))  # one line, 999 bytes
    pieces = split_document(line, 100)
    assert "".join(pieces) == line
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:-1])


def test_draw_order_takes_every_source_once_before_any_twice():
    rng = np.random.default_rng(0)
    sources = np.sort(rng.integers(0, 7, size=60))
    order = draw_order(sources.size, 3, sources)
    assert sorted(order.tolist()) == list(range(60))
    seen, rounds = {}, []
    for unit in order:
        s = int(sources[unit])
        seen[s] = seen.get(s, 0) + 1
        rounds.append(seen[s])
    assert rounds == sorted(rounds)  # round k of every source before round k + 1 of any
    # without sources it is the plain seeded permutation (one unit per document)
    assert np.array_equal(draw_order(60, 3), np.random.default_rng(3).permutation(60))


def test_floor_refuses_sets_of_few_documents_and_names_the_domain():
    spec = HeldOutSpec(4, 99, 4, 99, min_documents=16)  # 400 tokens a set
    long_docs = np.full(40, 200)  # 200 tokens each: 2 per set
    short_docs = np.full(400, 20)  # 20 each: 20 per set
    assert plan_split(long_docs, spec, 0) is None
    valid, test = plan_split(short_docs, spec, 0)
    assert valid.size == 20 and test.size == 20 and not set(valid) & set(test)
    with pytest.raises(ValueError) as err:
        check_domains({"books": long_docs, "tweets": short_docs}, spec, 0)
    msg = str(err.value)
    assert "domain books:" in msg and "domain tweets" not in msg
    assert "at least 16 documents" in msg and "the valid set 2" in msg
    assert "--max-piece-bytes" in msg and "--min-heldout-documents" in msg


def test_held_out_pieces_spread_over_sources():
    # 5 sources of 50 pieces each: a 20-piece set takes 4 of each, never 20 of one
    sources = np.repeat(np.arange(5), 50)
    spec = HeldOutSpec(20, 9, 20, 9, min_documents=16)
    valid, test = plan_split(np.full(250, 10), spec, 11, sources)
    assert np.bincount(sources[valid], minlength=5).tolist() == [4] * 5
    assert np.bincount(sources[test], minlength=5).tolist() == [4] * 5


def _long_document_corpus(folder, num_docs: int, kb: int, seed: int) -> None:
    """A few very long documents (kb KB each) of real text from this machine: the Python
    standard library's modules, concatenated (no test fixture corpus reuses this)."""
    import sysconfig

    lib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(lib) if n.endswith(".py"))
    random.Random(seed).shuffle(names)
    texts, current = [], ""
    for name in names:
        current += open(os.path.join(lib, name), encoding="utf-8", errors="replace").read()
        if len(current) >= kb * 1000:
            texts.append(current[:kb * 1000])
            current = ""
            if len(texts) == num_docs:
                break
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "code.jsonl"), "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def test_build_domains_cuts_few_long_documents_into_many_held_out_pieces(tmp_path):
    """Six documents of 100 KB: whole-document hold-out would give a set of one document;
    cut into 1 KB pieces, each set holds >= 16 pieces from every source, training keeps the
    rest joined back, and the manifest records documents, sources and tokens per set."""
    from megatron_ddk.data.manifest import load_manifest

    corpus = tmp_path / "corpus"
    _long_document_corpus(str(corpus), 6, 100, seed=5)
    out = tmp_path / "datasets"
    base = ["tools/build_domains.py", "--input", str(corpus), "--output-dir", str(out),
            "--tokenizer-model", str(tmp_path / "tok" / "t.model"), "--train-tokenizer",
            "--vocab-size", "600", "--valid-samples", "32", "--valid-seq-length", "255",
            "--workers", "1"]
    with pytest.raises(RuntimeError) as whole:
        tiny_run.run_tool(base + ["--max-piece-bytes", "0"])
    assert "domain code:" in str(whole.value) and "at least 16 documents" in str(whole.value)
    assert "the valid set 1 (from 1 sources)" in str(whole.value)
    assert not (out / "manifest.yaml").exists()
    tiny_run.run_tool(base)
    d = load_manifest(str(out / "manifest.yaml")).domains[0]
    assert d.num_valid_documents >= 16 and d.num_test_documents >= 16
    assert d.num_valid_sources == 6 and d.num_test_sources == 6
    assert d.num_train_sources == 6
    # training runs are joined pieces: far fewer documents than pieces held out around them
    assert d.num_train_documents <= d.num_valid_documents + d.num_test_documents + 6
    assert d.num_valid_tokens >= 32 * 256 and d.num_test_tokens >= 32 * 256
