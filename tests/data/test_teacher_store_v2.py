"""The store's files (data/teacher_store.py, data/store_shards.py) without a model: format 2
(both id codecs) written and read back against the arrays it was given, format 1 and format-2
stores written before the ef id codec still read, damaged or mixed chunks named, the header's
measured sizes equal to the files on disk."""

import json
import math
import os
import shutil
import zlib

import numpy as np
import pytest

from megatron_ddk.data.store_codec import StoreEncoding, adaptive_counts, fold_rest
from megatron_ddk.data.teacher_store import StoreWriter, TeacherStore

V, SEQ, K, M = 700, 16, 8, 10
IDENT = {"vocab_size": V, "seq_length": SEQ, "domains": ["a", "b"], "num_train_samples": [M, M],
         "temperature": 1.0, "seed": 3}


def _arrays(seed, ids):
    """[m, SEQ, K] descending top-K of random dense distributions, their rest (float64 ref)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(len(ids), SEQ, V)) * 3
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=-1)[..., :K]
    vals = np.take_along_axis(logp, order, -1)
    rest = np.log(1 - np.exp(vals).sum(-1))
    return {"sample_ids": np.asarray(ids), "checksums": np.arange(len(ids), dtype=np.uint32),
            "topk_ids": order, "topk_logprobs": vals.astype(np.float32),
            "rest_logprob": rest.astype(np.float32)}


def _write(root, encoding, shard=4):
    covered = {"a": np.arange(M)[::-1].copy(), "b": np.arange(M)}
    w = StoreWriter(str(root), IDENT, K, "float32", shard, covered, encoding=encoding)
    w.begin()
    truth = {}
    for d, (name, ids) in enumerate(covered.items()):
        for j in range(-(-M // shard)):
            part = ids[j * shard:(j + 1) * shard]
            arrays = _arrays(10 * d + j, part)
            w.write_shard(name, j, arrays)
            for r, s in enumerate(part):
                truth[(d, int(s))] = {k: v[r] for k, v in arrays.items()
                                      if k.startswith(("t", "r"))}
    w.finish({"a": 1.0, "b": 2.0})
    return truth


@pytest.mark.parametrize("id_codec", ["packed", "ef"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_format2_reads_back_what_the_codec_keeps(tmp_path, compression, id_codec):
    pytest.importorskip("zstandard") if compression == "zstd" else None
    enc = StoreEncoding(vocab_size=V, top_k=K, top_p=0.6, logprob_codec="float32",
                        compression=compression, id_codec=id_codec)
    truth = _write(tmp_path, enc)
    store = TeacherStore(str(tmp_path), ["a", "b"])
    keys = list(truth)
    ids, logp, rest = store.read([d for d, _ in keys], [s for _, s in keys])
    for i, key in enumerate(keys):
        t = truth[key]
        n = adaptive_counts(t["topk_logprobs"], 0.6)
        for tok in range(SEQ):
            assert np.array_equal(ids[i, tok, :n[tok]].numpy(), t["topk_ids"][tok, :n[tok]])
            assert (ids[i, tok, n[tok]:] == -1).all()
            assert np.array_equal(logp[i, tok, :n[tok]].numpy(), t["topk_logprobs"][tok, :n[tok]])
        want_rest = fold_rest(t["topk_logprobs"], t["rest_logprob"], n)
        assert np.allclose(rest[i].numpy(), want_rest, rtol=0, atol=1e-6)
    header = json.load(open(tmp_path / "header.json"))
    files = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path)
                for f in fs if "shard_" in d)
    assert header["measured_bytes_per_token"] == pytest.approx(files / (2 * M * SEQ))
    assert header["encoding"]["id_bits"] == 10 and header["format_version"] == 2
    assert header["encoding"]["id_codec"] == id_codec
    assert 1 <= header["entries_per_token"] < K


def test_format1_store_still_loads(tmp_path):
    truth = _write(tmp_path, None)
    header = json.load(open(tmp_path / "header.json"))
    assert header["format_version"] == 1 and header["dtypes"]["topk_ids"] == "uint16"
    assert sorted(os.listdir(tmp_path / "a" / "shard_000000")) == sorted(
        f + ".npy" for f in ("sample_ids", "checksums", "topk_ids", "topk_logprobs",
                             "rest_logprob"))
    store = TeacherStore(str(tmp_path), ["a", "b"])
    ids, logp, rest = store.read([0, 1], [3, 7])
    for i, key in enumerate([(0, 3), (1, 7)]):
        assert np.array_equal(ids[i].numpy(), truth[key]["topk_ids"])
        assert np.array_equal(logp[i].numpy(), truth[key]["topk_logprobs"])
        assert np.array_equal(rest[i].numpy(), truth[key]["rest_logprob"])


@pytest.mark.parametrize("id_codec", ["packed", "ef"])
def test_corrupt_chunk_is_named(tmp_path, id_codec):
    _write(tmp_path, StoreEncoding(vocab_size=V, top_k=K, top_p=0.9, id_codec=id_codec))
    path = tmp_path / "b" / "shard_000001" / "chunks.bin"
    index = np.load(tmp_path / "b" / "shard_000001" / "index.npy")
    with open(path, "r+b") as f:  # one byte inside row 2's chunk
        f.seek(int(index[2]) + 20)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))
    store = TeacherStore(str(tmp_path), ["a", "b"])
    store.read([1], [5])  # another row of the same shard still reads
    with pytest.raises(ValueError, match=r"b/shard_000001/chunks.bin row 2 \(sample 6\): crc32"):
        store.read([1], [6])


@pytest.mark.parametrize("id_codec", ["packed", "ef"])
def test_truncated_shard_is_named_at_open(tmp_path, id_codec):
    _write(tmp_path, StoreEncoding(vocab_size=V, top_k=K, id_codec=id_codec))
    path = tmp_path / "a" / "shard_000000" / "chunks.bin"
    os.truncate(path, os.path.getsize(path) - 3)
    with pytest.raises(ValueError, match=r"a/shard_000000/chunks.bin: .*\(truncated or corrupt"):
        TeacherStore(str(tmp_path), ["a", "b"])


@pytest.mark.parametrize("mine,other", [({"logprob_codec": "q4"}, {"logprob_codec": "q8"}),
                                        ({"id_codec": "ef"}, {"id_codec": "ef",
                                                              "logprob_codec": "q4"}),
                                        ({"id_codec": "ef"}, {"id_codec": "packed"}),
                                        ({"id_codec": "packed"}, {"id_codec": "ef"})])
def test_mixed_encoding_shard_is_named(tmp_path, mine, other):
    _write(tmp_path / "mine", StoreEncoding(vocab_size=V, top_k=K, **mine))
    _write(tmp_path / "other", StoreEncoding(vocab_size=V, top_k=K, **other))
    target = tmp_path / "mine" / "a" / "shard_000001"
    shutil.rmtree(target)
    shutil.copytree(tmp_path / "other" / "a" / "shard_000001", target)
    store = TeacherStore(str(tmp_path / "mine"), ["a", "b"])
    with pytest.raises(ValueError, match=r"a/shard_000001/chunks.bin row 0 .*: written by format "
                                         r"2 encoding tag .* header says"):
        store.read([0], [5])  # a's ids are covered in reverse: 5 is row 0 of shard 1


@pytest.mark.parametrize("codec", ["q8", "float16"])
def test_format2_store_written_before_ef_still_loads(tmp_path, codec):
    """A store of the packed path whose header is made the pre-change way: no id_codec in its
    encoding, chunks tagged with the crc32 of the encoding's fields of then (written here)."""
    enc = StoreEncoding(vocab_size=V, top_k=K, top_p=0.9, logprob_codec=codec)
    truth = _write(tmp_path, enc)
    path = tmp_path / "header.json"
    header = json.load(open(path))
    del header["encoding"]["id_codec"]
    json.dump(header, open(path, "w"))
    old = {k: header["encoding"][k] for k in ("vocab_size", "top_k", "top_p", "logprob_codec",
                                                "compression", "zstd_level")}
    old_tag = zlib.crc32(json.dumps(old, sort_keys=True).encode())
    chunks = open(tmp_path / "a" / "shard_000000" / "chunks.bin", "rb").read()
    assert int.from_bytes(chunks[8:12], "little") == old_tag  # the frame's tag field
    store = TeacherStore(str(tmp_path), ["a", "b"])
    keys = list(truth)
    ids, logp, _ = store.read([d for d, _ in keys], [s for _, s in keys])
    for i, key in enumerate(keys):
        n = adaptive_counts(truth[key]["topk_logprobs"], 0.9)
        for tok in range(SEQ):  # packed keeps the rank order: the ids exactly
            want = truth[key]["topk_ids"][tok, :n[tok]]
            assert np.array_equal(ids[i, tok, :n[tok]].numpy(), want)
    # an unfinished store of then resumes with the packed codec, and refuses ef
    header["complete"] = False
    json.dump(header, open(path, "w"))
    covered = {"a": np.arange(M)[::-1].copy(), "b": np.arange(M)}
    assert StoreWriter(str(tmp_path), IDENT, K, "float32", 4, covered, encoding=enc).begin()
    json.dump(header, open(path, "w"))
    ef = StoreEncoding(vocab_size=V, top_k=K, top_p=0.9, logprob_codec=codec, id_codec="ef")
    with pytest.raises(ValueError, match=r"another plan \(differs in \['encoding'\]\)"):
        StoreWriter(str(tmp_path), IDENT, K, "float32", 4, covered, encoding=ef).begin()


def test_unknown_format_and_another_plan_are_refused(tmp_path):
    _write(tmp_path, StoreEncoding(vocab_size=V, top_k=K))
    with pytest.raises(ValueError, match="another plan .*encoding"):
        StoreWriter(str(tmp_path), IDENT, K, "float32", 4, {"a": np.arange(M), "b": np.arange(M)},
                    encoding=StoreEncoding(vocab_size=V, top_k=K, top_p=0.5)).begin()
    header = json.load(open(tmp_path / "header.json"))
    header["format_version"] = 3
    json.dump(header, open(tmp_path / "header.json", "w"))
    with pytest.raises(ValueError, match="format_version 3 is not one of"):
        TeacherStore(str(tmp_path), ["a", "b"])


def test_coverage_bound_without_known_initial_weights_covers_any_interval_0():
    from megatron_ddk.data.mixture import IntervalMixture
    from megatron_ddk.data.teacher_store import max_samples_per_domain

    sizes, gbs, interval, steps = [500, 500, 500], 8, 5, 12
    bound = max_samples_per_domain(sizes, gbs, interval, steps, "ddk", weights=None, alpha=0.5)
    w_max = 0.5 + 0.5 / 3  # Eq. 2's cap on every later interval
    later = math.ceil(w_max * 5 * gbs) + math.ceil(w_max * 2 * gbs)
    assert list(bound) == [5 * gbs + later] * 3  # interval 0: all of it to any one domain
    for first in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]):  # extreme initial weights, then w_max
        mix = IntervalMixture(np.array(sizes), gbs, interval, 0)
        for t, k in enumerate((5, 5, 2)):
            w = first if t == 0 else [w_max, (1 - w_max) / 2, (1 - w_max) / 2]
            mix.start_interval(np.array(w), num_steps=k)
            mix.advance(k)
        assert (mix.samples_consumed <= bound).all()


@pytest.mark.parametrize("id_codec", ["packed", "ef", None])  # None: a header from before ef
def test_plan_teacher_store_projects_a_store_s_measured_entries(tmp_path, id_codec):
    from megatron_ddk.commands import plan_teacher_store as plan
    from megatron_ddk.data.store_codec import bytes_per_token

    enc = StoreEncoding(vocab_size=V, top_k=K, top_p=0.6, logprob_codec="q4",
                        id_codec=id_codec or "packed")
    _write(tmp_path, enc)
    if id_codec is None:
        header = json.load(open(tmp_path / "header.json"))
        del header["encoding"]["id_codec"]
        json.dump(header, open(tmp_path / "header.json", "w"))
    setting, entries, _, measured = plan._from_store(str(tmp_path))
    assert setting["id_codec"] == (id_codec or "packed") and 1 <= entries < K
    text = plan.table(15e9, 151_646, [32], setting, entries, "x", measured)
    want = bytes_per_token(entries, 151_646, "q4", K, 0.6, id_codec or "packed")
    assert f"{want:.1f}" in text.splitlines()[2] and f"{15e9 * want / 1e12:.2f}" in text
    # the default (no --store): the bench's default setting, ef, at most 60.4 bytes per token
    default = plan.table(15e9, 151_646, [32], plan.BENCH_SETTING, plan.BENCH_ENTRIES_PER_TOKEN,
                         "bench")
    assert "format 2 ef K=16 top_p=1 q4 tail 8" in default and " 60.4 " in default \
        and " 0.91 " in default
