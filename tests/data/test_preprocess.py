"""megatron_ddk.data.preprocessing.build: tokenize-and-write, worker independence, atomic output,
bad inputs, the validation hold-out, and that Megatron-Core's IndexedDataset/GPTDataset read it."""

from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest
import sentencepiece

from megatron_ddk.data.preprocessing.build import select_validation_documents, tokenize_to_datasets
from megatron_ddk.data.preprocessing.domain_split import build_domain


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    return [np.array(ds[i]) for i in range(len(ds))]


def test_tokens_match_reference_and_decode_exactly(tmp_path, tiny_tokenizer, make_jsonl,
                                                   samples):
    texts = [samples["code"], samples["cjk"], "", samples["prose"]]
    src = make_jsonl(tmp_path / "in.jsonl", texts)
    with open(src, "a") as f:
        f.write("   \n")  # a blank line is ignored
    prefix = str(tmp_path / "out" / "ds_text_document")
    res = tokenize_to_datasets([src], {"text": prefix}, tiny_tokenizer)
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    kept = [t for t in texts if t]
    docs = _read(prefix)
    assert len(docs) == res.num_documents["text"] == 3 and res.num_empty_skipped == 1
    for doc, text in zip(docs, kept):
        assert doc.tolist() == sp.encode(text) + [sp.eos_id()]
        assert sp.decode(doc[:-1].tolist()) == text
    total = sum(len(sp.encode(t)) + 1 for t in kept)
    assert res.num_tokens["text"] == total
    assert os.path.getsize(prefix + ".bin") == 2 * total  # uint16 for a vocabulary < 65500


def test_worker_count_does_not_change_bytes(tmp_path, tiny_tokenizer, make_jsonl, make_texts):
    src = make_jsonl(tmp_path / "in.jsonl", make_texts(700))  # > 2 batches of 256 lines
    one, two = str(tmp_path / "w1"), str(tmp_path / "w2")
    tokenize_to_datasets([src], {"text": one}, tiny_tokenizer, workers=1)
    tokenize_to_datasets([src], {"text": two}, tiny_tokenizer, workers=2)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(one + suffix, two + suffix, shallow=False)


def test_no_eod_multiple_keys_and_txt(tmp_path, tiny_tokenizer):
    import json

    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"a": "x = 1", "b": "中文"}) + "\n", encoding="utf-8")
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    tokenize_to_datasets([str(src)], {"a": pa, "b": pb}, tiny_tokenizer, append_eod=False)
    assert _read(pa)[0].tolist() == sp.encode("x = 1")
    assert _read(pb)[0].tolist() == sp.encode("中文")
    txt = tmp_path / "in.txt"
    txt.write_bytes("line one\r\n\tline two\nlast".encode("utf-8"))
    pt = str(tmp_path / "t")
    tokenize_to_datasets([str(txt)], {"text": pt}, tiny_tokenizer)
    assert [sp.decode(d[:-1].tolist()) for d in _read(pt)] == ["line one", "\tline two", "last"]


def test_malformed_line_error_and_skip(tmp_path, tiny_tokenizer, make_jsonl):
    src = make_jsonl(tmp_path / "in.jsonl", ["good one", "good two"])
    with open(src, "a") as f:
        f.write('{"text": "unterminated\n{"other": 1}\n[1, 2]\n{"text": "fine"}\n')
    prefix = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"in\.jsonl:3: invalid JSON.*--skip-malformed"):
        tokenize_to_datasets([src], {"text": prefix}, tiny_tokenizer, workers=2)
    assert not os.listdir(tmp_path / ".") == []  # input still there
    assert [f for f in os.listdir(tmp_path) if f.startswith("out")] == []  # nothing written
    res = tokenize_to_datasets([src], {"text": prefix}, tiny_tokenizer, skip_malformed=True)
    assert res.num_malformed_skipped == 3 and res.num_documents["text"] == 3
    other = make_jsonl(tmp_path / "other.jsonl", ["ok"])
    with open(other, "a") as f:
        f.write('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"other\.jsonl:2: key 'text' is int"):
        tokenize_to_datasets([other], {"text": prefix}, tiny_tokenizer)


def test_failed_run_keeps_old_output_and_leaves_no_temp(tmp_path, tiny_tokenizer, make_jsonl):
    good = make_jsonl(tmp_path / "good.jsonl", ["old data"] * 3)
    prefix = str(tmp_path / "out" / "ds")
    tokenize_to_datasets([good], {"text": prefix}, tiny_tokenizer)
    before = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}
    bad = make_jsonl(tmp_path / "bad.jsonl", ["new data"] * 300)
    with open(bad, "a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:301"):
        tokenize_to_datasets([bad], {"text": prefix}, tiny_tokenizer, workers=2)
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds.tokenizer.json"]
    assert {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")} == before


def test_interrupt_mid_run_leaves_nothing(tmp_path, tiny_tokenizer, make_jsonl, make_texts,
                                           monkeypatch):
    """Ctrl-C (KeyboardInterrupt) after two batches: no output, no temp files, no workers."""
    import multiprocessing

    from megatron_ddk.data.preprocessing import engine

    src = make_jsonl(tmp_path / "in.jsonl", make_texts(1000, seed=2))
    real, calls = engine.IndexedWriter.append, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(engine.IndexedWriter, "append", interrupted)
    monkeypatch.setattr(engine, "BATCH_LINES", 256)  # several batches
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tokenize_to_datasets([src], {"text": str(out / "ds")}, tiny_tokenizer, workers=2)
    assert os.listdir(out) == []
    assert multiprocessing.active_children() == []


def test_missing_input_and_missing_tokenizer(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="input file .*absent.jsonl does not exist"):
        tokenize_to_datasets([str(tmp_path / "absent.jsonl")], {"text": str(tmp_path / "o")},
                             tiny_tokenizer)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="tokenizer model .*gone.model.* does not exist"):
        tokenize_to_datasets([str(src)], {"text": str(tmp_path / "o")},
                             str(tmp_path / "gone.model"))


def _reference_selection(lengths, target, seed):
    """Independent re-statement: walk the seeded permutation, stop once the sum reaches target."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    taken, total = [], 0
    for i in order:
        if total >= target:
            break
        taken.append(int(i))
        total += int(lengths[i])
    return sorted(taken), total


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_select_validation_documents(seed):
    lengths = np.random.default_rng(100 + seed).integers(1, 50, size=40)
    target = int(lengths.sum() // 3)
    got = select_validation_documents(lengths, target, seed)
    ref, total = _reference_selection(lengths, target, seed)
    assert got.tolist() == ref
    assert lengths[got].sum() == total >= target
    with pytest.raises(ValueError, match="validation needs .* nothing would be left"):
        select_validation_documents(lengths, int(lengths.sum()), seed)
    # the valid half of the train/valid/test split is this same selection
    from megatron_ddk.data.preprocessing.heldout import HeldOutSpec, plan_split

    spec = HeldOutSpec(1, target - 1, 0, 1, max_heldout_share=0.99)  # exactly target tokens
    assert plan_split(lengths, spec, seed)[0].tolist() == ref


def test_build_domain_split_is_disjoint_and_complete(tmp_path, tiny_tokenizer, make_jsonl,
                                                     make_texts):
    texts = [f"doc {i}: " + t for i, t in enumerate(make_texts(60, seed=3))]
    src = make_jsonl(tmp_path / "dom.jsonl", texts)
    entry = build_domain("dom", [src], str(tmp_path / "out"), tiny_tokenizer,
                         valid_samples=4, valid_seq_length=31, workers=2, test_samples=3,
                         test_seq_length=15)
    sp = sentencepiece.SentencePieceProcessor(model_file=tiny_tokenizer)
    train = [sp.decode(d[:-1].tolist()) for d in _read(entry.train_prefixes[0])]
    valid = [sp.decode(d[:-1].tolist()) for d in _read(entry.valid_prefix)]
    test = [sp.decode(d[:-1].tolist()) for d in _read(entry.test_prefix)]
    assert not set(train) & set(valid) and not set(train) & set(test)
    assert not set(valid) & set(test)
    assert sorted(train + valid + test) == sorted(texts)
    assert train == [t for t in texts if t in set(train)]  # original order kept
    assert entry.num_valid_tokens >= 4 * 32 and entry.num_test_tokens >= 3 * 16
    assert entry.num_valid_documents == len(valid) and entry.num_train_documents == len(train)
    assert entry.num_test_documents == len(test)
    assert entry.num_train_tokens == sum(len(sp.encode(t)) + 1 for t in train)
    assert entry.num_test_tokens == sum(len(sp.encode(t)) + 1 for t in test)
    assert sorted(os.listdir(tmp_path / "out" / "dom")) == [
        f"{split}_text_document{suffix}" for split in ("test", "train", "valid")
        for suffix in (".bin", ".idx", ".tokenizer.json")]


def test_build_domain_errors(tmp_path, tiny_tokenizer, make_jsonl):
    empty = make_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"domain empty is empty: .*empty\.jsonl hold no "
                       r"document with text \(2 documents read, 2 of them without text\)"):
        build_domain("empty", [empty], str(tmp_path / "out"), tiny_tokenizer, 1, 8)
    assert os.listdir(tmp_path / "out" / "empty") == []
    small = make_jsonl(tmp_path / "small.jsonl", ["a few words"] * 3)
    with pytest.raises(ValueError, match=r"domain small: the held-out sets need valid 1 x 4097 "
                       r"\+ test 1 x 4097 = 8194 tokens but the domain has \d+ tokens in 3 "
                       r"documents.*no --valid-samples fits.*lower --valid-samples"):
        build_domain("small", [small], str(tmp_path / "out"), tiny_tokenizer, 1, 4096)
    assert not [f for f in os.listdir(tmp_path / "out" / "small") if f.endswith((".bin", ".idx"))]


def test_gpt_dataset_reads_the_output(tmp_path, tiny_tokenizer, make_jsonl, make_texts):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    from megatron_ddk.data.tokenizer import build_tokenizer

    src = make_jsonl(tmp_path / "in.jsonl", make_texts(50, seed=5))
    prefix = str(tmp_path / "gpt" / "ds")
    res = tokenize_to_datasets([src], {"text": prefix}, tiny_tokenizer)
    seq = 32
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=seq, tokenizer=build_tokenizer(tiny_tokenizer),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"), mid_level_dataset_surplus=0.005)
    indexed = IndexedDataset(prefix, mmap=True)
    ds = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), None,
                    Split.train, config)
    # one epoch of samples of seq + 1 tokens that overlap by one token
    assert len(ds) == (res.num_tokens["text"] - 1) // seq
    sample = ds[0]
    assert sample["tokens"].shape[0] == seq
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
    assert int(sample["tokens"].max()) < 800
