"""tools/build_demo_corpus.py: >= 4 real domains of >= 0.3 MB, deterministic, hashes reported,
large files split losslessly, missing sources skipped."""

from __future__ import annotations

import hashlib
import json
import os

import pytest


@pytest.fixture(scope="module")
def demo():
    from megatron_ddk.commands import build_demo_corpus

    return build_demo_corpus


@pytest.fixture(scope="module")
def corpus(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return str(out), demo.build_demo_corpus(str(out), max_mb=0.35, min_mb=0.3, progress=False)


def _docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_at_least_four_domains_of_real_text(corpus):
    out, summary = corpus
    assert len(summary["domains"]) >= 4
    for d in summary["domains"]:
        path = os.path.join(out, d["file"])
        docs = _docs(path)
        text_bytes = sum(len(doc["text"].encode("utf-8")) for doc in docs)
        assert 0.3e6 <= text_bytes == d["num_text_bytes"] <= 0.35e6
        assert len(docs) == d["num_documents"]
        with open(path, "rb") as f:
            assert d["sha256"] == "sha256:" + hashlib.sha256(f.read()).hexdigest()
        assert len({doc["text"] for doc in docs}) == len(docs)  # no exact duplicates
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == summary


def test_domains_have_different_character(corpus):
    """Cheap fingerprints: each primary domain is what its name says."""
    out, summary = corpus
    checks = {
        "python_code": lambda t: "def " in t or "import " in t,
        "c_headers": lambda t: "#define" in t or "#include" in t or "#if" in t,
        "licenses": lambda t: "licen" in t.lower() or "copyright" in t.lower(),
        "english_prose": lambda t: sum(c.isalpha() or c == " " for c in t) > 0.75 * len(t),
        "unicode_names": lambda t: t.startswith("U+") and " LETTER " in t or " SIGN " in t,
    }
    for d in summary["domains"]:
        if d["name"] in checks:
            docs = _docs(os.path.join(out, d["file"]))
            share = sum(checks[d["name"]](doc["text"]) for doc in docs) / len(docs)
            assert share > 0.6, (d["name"], share)


def test_deterministic(demo, corpus, tmp_path):
    _, first = corpus
    second = demo.build_demo_corpus(str(tmp_path), max_mb=0.35, min_mb=0.3, progress=False)
    assert [d["sha256"] for d in second["domains"]] == [d["sha256"] for d in first["domains"]]


def test_split_document_is_lossless(demo):
    text = "short line\n" * 50 + "长" * 3000 + "\nend\n"
    pieces = demo.split_document(text, 1024)
    assert "".join(pieces) == text
    assert all(len(p.encode("utf-8")) <= 1024 for p in pieces)
    assert demo.split_document("small", 1024) == ["small"]


def test_missing_source_is_skipped_and_too_few_is_an_error(demo, tmp_path, monkeypatch):
    candidates = dict(demo.CANDIDATES)
    candidates = {"nothing_here": ("a folder absent on this machine", lambda: iter(())),
                  **candidates}
    monkeypatch.setattr(demo, "CANDIDATES", candidates)
    summary = demo.build_demo_corpus(str(tmp_path / "a"), max_mb=0.31, min_mb=0.3,
                                     progress=False)
    assert summary["skipped"][0]["name"] == "nothing_here"
    assert len(summary["domains"]) == 5
    with pytest.raises(ValueError, match="only 1 demo domains could be built"):
        demo.build_demo_corpus(str(tmp_path / "b"), max_mb=0.31, min_mb=0.3, progress=False,
                               candidates=["nothing_here", "python_code"])


def test_domains_share_no_text(corpus):
    """No prose document quotes the code domain (no docstrings), and no licence paragraph
    repeats."""
    out, summary = corpus
    names = {d["name"] for d in summary["domains"]}
    assert {"python_code", "english_prose", "licenses", "unicode_names"} <= names
    code = "\n".join(d["text"] for d in _docs(os.path.join(out, "python_code.jsonl")))
    code_lines = {ln.strip() for ln in code.splitlines() if len(ln.strip()) >= 60}
    prose = [ln.strip() for d in _docs(os.path.join(out, "english_prose.jsonl"))
             for ln in d["text"].splitlines() if len(ln.strip()) >= 60]
    shared = [ln for ln in prose if ln in code_lines]
    assert len(shared) <= 0.01 * max(1, len(prose)), shared[:5]
    paras = [" ".join(p.split()) for d in _docs(os.path.join(out, "licenses.jsonl"))
             for p in d["text"].split("\n\n") if p.strip()]
    assert len(paras) == len(set(paras))
