"""The streaming preprocessing engine against an independent reference: a plain loop that
restates Megatron-LM's preprocess_data.py encode step over Megatron-Core's IndexedDatasetBuilder.

Covers the index writer (byte-identical to IndexedDatasetBuilder, empty and multi-sequence
documents, chunked streaming), byte identity across worker counts and --partitions (input order
with --keep-sequential-samples, Megatron-LM's round-robin partition-merge order without), the
sentence-level layout (JSON lists of sentences, --split-sentences with a stand-in splitter), and
the bounded in-flight window.
"""

from __future__ import annotations

import filecmp
import json
import re

import numpy as np
import pytest
import sentencepiece

from megatron_ddk.data.megatron_tokenizers import TokenizerSpec
from megatron_ddk.data.preprocessing import engine
from megatron_ddk.data.preprocessing.engine import EncodeJob, run_encode
from megatron_ddk.data.preprocessing.writer import IndexedWriter


def megatron_reference(path, prefix, keys, tokenize, eod, vocab_size, append_eod=True,
                       splitter=None, order=None):
    """Megatron-LM's Encoder.encode + IndexedDatasetBuilder, restated as a plain loop: every
    line is a document; a JSON list is its sentences; zero-token sentences are dropped; eod
    goes after the last sequence of a non-empty document; an empty document is still added."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if order is not None:
        lines = [lines[i] for i in order]
    out = {k: f"{prefix}_{k}" for k in keys}
    builders = {k: IndexedDatasetBuilder(out[k] + ".bin", dtype=DType.optimal_dtype(vocab_size))
                for k in keys}
    for line in lines:
        data = json.loads(line)
        for k in keys:
            text = data[k]
            sentences = text if isinstance(text, list) else (splitter(text) if splitter
                                                             else [text])
            doc, lens = [], []
            for sentence in sentences:
                ids = tokenize(sentence)
                if ids:
                    doc.extend(ids)
                    lens.append(len(ids))
            if doc and append_eod:
                doc.append(eod)
                lens[-1] += 1
            builders[k].add_document(doc, lens)
    for k in keys:
        builders[k].finalize(out[k] + ".idx")
    return out


def same_files(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + s, b + s, shallow=False) for s in (".bin", ".idx"))


@pytest.fixture
def corpus(tmp_path, make_texts):
    """40 documents: varied texts, an empty one, one given as a list of sentences, two keys."""
    texts = make_texts(40, seed=11)
    texts[5] = ""
    path = tmp_path / "in.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            value = ["first sentence. ", "", "second one\n"] if i == 7 else t
            f.write(json.dumps({"text": value, "title": f"doc {i}" if i % 9 else ""},
                               ensure_ascii=False) + "\n")
    return str(path)


def _job(corpus, prefix, model, **kw):
    keys = kw.pop("keys", ("text",))
    return EncodeJob(paths=[corpus], prefixes={k: f"{prefix}_{k}" for k in keys},
                     tokenizer=TokenizerSpec("GPTSentencePieceTokenizer", model),
                     keep_empty=True, **kw)


def test_index_writer_matches_indexed_dataset_builder(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    monkeypatch.setattr("megatron_ddk.data.preprocessing.writer._CHUNK", 3)  # stream in chunks
    rng = np.random.default_rng(0)
    docs = [[int(n) for n in rng.integers(1, 9, size=rng.integers(0, 4))] for _ in range(25)]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ours = IndexedWriter(str(tmp_path / "ours"), np.dtype(np.uint16))
    for lengths in (docs[:10], docs[10:11], docs[11:]):  # three batches
        tokens, seqs = [], []
        for doc in lengths:
            ids = rng.integers(0, 60000, size=sum(doc)).tolist()
            ref.add_document(ids, doc)
            tokens.extend(ids)
            seqs.extend(doc)
        ours.append(np.array(tokens, dtype=np.uint16), np.array(seqs, dtype=np.int32),
                    np.array([len(d) for d in lengths], dtype=np.int64))
    ref.finalize(str(tmp_path / "ref.idx"))
    ours.finalize()
    assert same_files(str(tmp_path / "ours"), str(tmp_path / "ref"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.bin", "ours.idx", "ref.bin",
                                                          "ref.idx"]


@pytest.mark.parametrize("workers", [1, 2])
def test_bytes_equal_reference_for_workers_and_partitions(tmp_path, corpus, tiny_tokenizer,
                                                          monkeypatch, workers):
    monkeypatch.setattr(engine, "BATCH_LINES", 6)  # several batches per run
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    keys = ("text", "title")
    ref = megatron_reference(corpus, str(tmp_path / "ref"), keys, sp.encode, sp.eos_id(),
                             sp.get_piece_size())
    n, parts = 40, 3
    rr = [i for p in range(parts) for i in range(n) if i % parts == p]
    ref_rr = megatron_reference(corpus, str(tmp_path / "rr"), keys, sp.encode, sp.eos_id(),
                                sp.get_piece_size(), order=rr)
    for partitions, sequential, expected in [(1, False, ref), (parts, True, ref),
                                             (parts, False, ref_rr)]:
        prefix = str(tmp_path / f"w{workers}p{partitions}{sequential}")
        stats = run_encode(_job(corpus, prefix, tiny_tokenizer, keys=keys, workers=workers,
                                partitions=partitions, keep_sequential_samples=sequential))
        for k in keys:
            assert same_files(f"{prefix}_{k}", expected[k]), (k, partitions, sequential)
        assert stats.num_documents == {"text": 40, "title": 40}
        assert stats.num_empty == 1 + 5  # text of doc 5; titles of docs 0, 9, 18, 27, 36


def test_no_eod_and_skipping_empty_documents(tmp_path, corpus, tiny_tokenizer):
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    ref = megatron_reference(corpus, str(tmp_path / "ref"), ["text"], sp.encode, sp.eos_id(),
                             sp.get_piece_size(), append_eod=False)
    prefix = str(tmp_path / "ours")
    run_encode(_job(corpus, prefix, tiny_tokenizer, append_eod=False))
    assert same_files(prefix + "_text", ref["text"])
    # megatron_ddk's own pipeline skips empty documents instead of writing them empty
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    job = _job(corpus, str(tmp_path / "skip"), tiny_tokenizer)
    job.keep_empty = False
    stats = run_encode(job)
    assert stats.num_documents["text"] == 39 and stats.num_empty == 1
    ds = IndexedDataset(str(tmp_path / "skip_text"))
    assert len(ds.document_indices) == 40 and len(ds) == 39 + 1  # doc 7 has two sentences


def _sentences(text):
    """A stand-in sentence splitter: after each '.', '!' or '?' plus following spaces."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@pytest.mark.parametrize("workers", [1, 2])
def test_split_sentences_layout(tmp_path, corpus, tiny_tokenizer, monkeypatch, workers):
    monkeypatch.setattr("megatron_ddk.data.preprocessing.sentences.make_splitter",
                        lambda lang, keep_newlines: _sentences)
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    ref = megatron_reference(corpus, str(tmp_path / "ref"), ["text"], sp.encode, sp.eos_id(),
                             sp.get_piece_size(), splitter=_sentences)
    prefix = str(tmp_path / "ours")
    run_encode(_job(corpus, prefix, tiny_tokenizer, split_sentences=True, workers=workers))
    assert same_files(prefix + "_text", ref["text"])


def test_in_flight_batches_are_bounded(tmp_path, tiny_tokenizer, make_jsonl, make_texts,
                                       monkeypatch):
    """The reader runs at most 2 x workers + 2 batches ahead of the writer."""
    monkeypatch.setattr(engine, "BATCH_LINES", 4)
    src = make_jsonl(tmp_path / "in.jsonl", make_texts(200, seed=4))
    read, written, ahead = [0], [0], []
    real_batches, real_append = engine._batches, IndexedWriter.append

    def counting_batches(*args):
        for item in real_batches(*args):
            read[0] += 1
            ahead.append(read[0] - written[0])
            yield item

    def counting_append(self, *args):
        written[0] += 1
        real_append(self, *args)

    monkeypatch.setattr(engine, "_batches", counting_batches)
    monkeypatch.setattr(IndexedWriter, "append", counting_append)
    run_encode(_job(src, str(tmp_path / "o"), tiny_tokenizer, workers=2))
    assert written[0] == read[0] == 50
    assert max(ahead) <= 2 * 2 + 2 + 2  # the window, plus one read and one being written
