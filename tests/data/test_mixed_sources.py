"""build_domains on corpora as users have them: one mixed file with a domain field reproduces the
per-domain folder build byte for byte; every format (JSONL, .jsonl.gz, .jsonl.zst, Parquet file
and folder, datasets.save_to_disk folder) gives the same .bin/.idx bytes for the same records;
bad input is named with one `error:` line and exit code 2. The corpus is tests/data/
mixed_corpus.py's four known sources (text on this machine), built at test time."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from megatron_ddk.commands import build_domains
from megatron_ddk.data.preprocessing.corpus import domain_name
from megatron_ddk.data.preprocessing.sources.labels import (
    SmallDomainRule,
    SpillWriter,
    apply_min_documents,
    parse_domain_map,
)
from megatron_ddk.data.preprocessing.sources.readers import MISSING, lookup
from tests.data.mixed_corpus import mixed_records, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPLIT = ["--valid-samples", "2", "--valid-seq-length", "256", "--workers", "1",
         "--min-heldout-documents", "2", "--max-piece-bytes", "256"]


@pytest.fixture(scope="module")
def records():
    return mixed_records(per_source=16)


def _snapshot(folder) -> dict:
    """Every dataset file (.bin/.idx) under folder -> its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith((".bin", ".idx")):
                path = os.path.join(root, name)
                out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _build(out, tokenizer, *inputs_and_flags):
    assert build_domains.main(["--output-dir", str(out), "--tokenizer-model", tokenizer,
                               *SPLIT, *inputs_and_flags]) == 0
    return _snapshot(out)


def test_domain_field_reproduces_the_per_domain_build(tmp_path, records, tiny_tokenizer):
    folder = tmp_path / "per_domain"
    folder.mkdir()
    for name in sorted({r["meta"]["source"] for r in records}):
        write_jsonl(folder / f"{name}.jsonl", [{"text": r["text"]} for r in records
                                               if r["meta"]["source"] == name])
    reference = _build(tmp_path / "ref", tiny_tokenizer, "--input", str(folder))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", records)
    got = _build(tmp_path / "out", tiny_tokenizer, "--input", mixed,
                 "--domain-field", "meta.source")
    assert got == reference and len(reference) == 4 * 6
    report = json.load(open(tmp_path / "out" / "domain_sources.json"))
    assert {row["label"]: row["documents"] for row in report["labels"]} == \
        {name: sum(r["meta"]["source"] == name for r in records)
         for name in {r["meta"]["source"] for r in records}}
    # the per-domain folder writes no report (and the default text key reads it as before)
    assert not (tmp_path / "ref" / "domain_sources.json").exists()


def _write_formats(tmp_path, records) -> dict:
    """The same records in every format; name -> the --input to give."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    out = {"jsonl": write_jsonl(tmp_path / "c.jsonl", records)}
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(lines)
    out["jsonl.gz"] = str(tmp_path / "c.jsonl.gz")
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    out["jsonl.zst"] = str(tmp_path / "c.jsonl.zst")
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "c.parquet")
    out["parquet"] = str(tmp_path / "c.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(records) // 2
    pq.write_table(table.slice(0, half), shards / "part-00000.parquet", row_group_size=7)
    pq.write_table(table.slice(half), shards / "part-00001.parquet")
    out["parquet folder"] = str(shards)
    datasets = pytest.importorskip("datasets")  # writes the reference save_to_disk folder
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"), max_shard_size="20KB")
    out["save_to_disk"] = str(tmp_path / "hf")
    return out


def test_every_format_gives_the_same_bytes(tmp_path, records, tiny_tokenizer):
    inputs = _write_formats(tmp_path, records)
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".arrow")]) > 1
    reference = _build(tmp_path / "out_jsonl", tiny_tokenizer, "--input", inputs.pop("jsonl"),
                       "--domain-field", "meta.source")
    for name, given in inputs.items():
        got = _build(tmp_path / f"out_{name.replace(' ', '_')}", tiny_tokenizer, "--input",
                     given, "--domain-field", "meta.source")
        assert got == reference, name


def test_globs_several_inputs_text_key_map_and_small_domains(tmp_path, records, tiny_tokenizer):
    half = len(records) // 2
    write_jsonl(tmp_path / "a.jsonl", [{"body": r["text"], "src": r["meta"]["source"]}
                                       for r in records[:half]])
    write_jsonl(tmp_path / "b.jsonl", [{"body": r["text"], "src": r["meta"]["source"]}
                                       for r in records[half:]])
    mapping = tmp_path / "map.yaml"
    mapping.write_text("c_headers: code\npython_code: code\n")
    _build(tmp_path / "out", tiny_tokenizer, "--input", str(tmp_path / "*.jsonl"),
           "--domain-field", "src", "--text-key", "body", "--domain-map", str(mapping))
    report = json.load(open(tmp_path / "out" / "domain_sources.json"))
    assert {row["label"]: row["domain"] for row in report["labels"]} == {
        "c_headers": "code", "python_code": "code", "licenses": "licenses",
        "man_pages": "man_pages"}
    import yaml

    manifest = yaml.safe_load(open(tmp_path / "out" / "manifest.yaml"))
    assert [d["name"] for d in manifest["domains"]] == ["code", "licenses", "man_pages"]


def test_labels_names_maps_and_small_domains(tmp_path):
    assert domain_name("Wikipedia (en)") == "Wikipedia_en" and domain_name("Pile-CC") == "Pile-CC"
    assert domain_name("***") is None
    assert parse_domain_map("Github=code, StackExchange=code") == {"Github": "code",
                                                                   "StackExchange": "code"}
    assert parse_domain_map('{"a b": "x"}') == {"a b": "x"}
    with pytest.raises(ValueError, match="expected value=name"):
        parse_domain_map("oops")
    assert lookup({"meta": {"set": "ArXiv"}}, "meta.set") == "ArXiv"
    assert lookup({"meta": '{"set": "ArXiv"}'}, "meta.set") == "ArXiv"  # JSON-string column
    assert lookup({"meta.set": "x"}, "meta.set") == "x" and lookup({}, "meta.set") is MISSING
    writer = SpillWriter(str(tmp_path / "spill"))
    for label, n in (("big", 5), ("tiny", 1), ("small one", 2)):
        for i in range(n):
            writer.write(label, f"{label} {i}")
    with pytest.raises(ValueError, match="'small one' and 'small/one' both become domain "
                       "'small_one'"):
        writer.name_of("small/one")
    writer.close()
    domains = apply_min_documents(writer, SmallDomainRule(3, "other"))
    assert [(d.name, len(d.paths)) for d in domains] == [("big", 1), ("other", 2)]
    with pytest.raises(ValueError, match=r"tiny \(1 documents"):
        apply_min_documents(writer, SmallDomainRule(3, "refuse"))


def _cli(tmp_path, *args, pre: str = "pass"):
    """`megatron-ddk build-domains` in a fresh process (pre: Python run first)."""
    code = (f"import sys; {pre}; from megatron_ddk.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "build-domains", "--output-dir",
                           str(tmp_path / "out"), "--tokenizer-model", "unused.model", *SPLIT,
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_error(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return lines[0]


def test_bad_input_is_named(tmp_path):
    rows = [{"text": "alpha beta", "meta": {"source": "a"}},
            {"text": "gamma delta", "meta": {"source": 7}},
            {"text": "no field here"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    line = _one_error(_cli(tmp_path, "--input", path, "--domain-field", "meta.sorce"))
    assert f"{path}:1: domain field 'meta.sorce' missing" in line and "--default-domain" in line
    line = _one_error(_cli(tmp_path, "--input", path, "--domain-field", "meta.source"))
    assert f"{path}:2: domain field 'meta.source' is int" in line
    line = _one_error(_cli(tmp_path, "--input", path, "--domains", "auto:4"))
    assert "K=4 is larger than the 3 documents" in line
    (tmp_path / "c.jsonl.zst").write_bytes(b"")
    line = _one_error(_cli(tmp_path, "--input", str(tmp_path / "c.jsonl.zst"), "--domain-field",
                           "meta.source", pre="sys.modules['zstandard'] = None"))
    assert "pip install 'megatron-ddk[formats]'" in line and "zstandard" in line
    line = _one_error(_cli(tmp_path, "--input", path, "--domains", "auto:2",
                           pre="sys.modules['sklearn'] = None"))
    assert "pip install 'megatron-ddk[cluster]'" in line and "scikit-learn" in line
    assert not (tmp_path / "out" / "manifest.yaml").exists()
