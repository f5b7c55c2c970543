"""`megatron-ddk pipeline` to its report on the two new forms of a corpus, at the smoke sizes of
examples/mixed_file and examples/auto_domains: a mixed Parquet file whose records name their
domain in a field, and an unlabeled JSONL file clustered into 3 domains (data.cluster.k: 3).
The corpus is tests/data/mixed_corpus.py's known sources (text on this machine), three of
them. Each file lies in a folder of its own (the pipeline's --corpus; see the report of issue 27
for a single file)."""

import json
import os
import subprocess
import sys

import pytest

from tests.data.mixed_corpus import mixed_records, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SOURCES = ("c_headers", "licenses", "python_code")


@pytest.fixture(scope="module")
def records():
    return [r for r in mixed_records(per_source=24) if r["meta"]["source"] in SOURCES]


ONE_ARM = "arms=[{name: DDK, run: {ddk: {policy: ddk}}}]"
"""The corpus form is what these tests vary: one arm (DDK) reaches the report; every arm's
pipeline is tested on the demo corpus (tests/pipeline/test_pipeline_run.py)."""


def _pipeline(example, corpus, out, *overrides):
    argv = [sys.executable, "-m", "megatron_ddk.cli", "pipeline", "--config",
            os.path.join(ROOT, "examples", example, "pipeline.yaml"), "--corpus", str(corpus),
            "--out", str(out), "--smoke", ONE_ARM, *overrides]
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.load(open(out / "report.json"))


def test_pipeline_on_a_mixed_parquet_file_with_a_domain_field(tmp_path, records):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(records), corpus / "mixed.parquet")
    report = _pipeline("mixed_file", corpus, tmp_path / "out", "data.domain_field=meta.source")
    assert sorted(report["table"]["domains"]) == list(SOURCES)
    assert report["table"]["columns"] == ["teacher", "student_before", "DDK"]
    sources = json.load(open(tmp_path / "out" / "data" / "datasets" / "domain_sources.json"))
    assert {row["label"]: row["documents"] for row in sources["labels"]} == \
        {s: sum(r["meta"]["source"] == s for r in records) for s in SOURCES}


def test_pipeline_on_an_unlabeled_jsonl_with_three_clusters(tmp_path, records):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "unlabeled.jsonl", [{"text": r["text"]} for r in records])
    report = _pipeline("auto_domains", corpus, tmp_path / "out")
    assert len(report["table"]["domains"]) == 3
    clusters = json.load(open(tmp_path / "out" / "data" / "datasets" / "clusters.json"))
    assert clusters["k"] == 3 and clusters["num_documents"] == len(records)
    assert sorted(report["table"]["domains"]) == sorted(c["domain"] for c in clusters["clusters"])


@pytest.mark.parametrize("smoke", [False, True])
def test_examples_load_and_pass_their_data_flags(tmp_path, smoke):
    from megatron_ddk.pipeline.config import load_pipeline_config
    from megatron_ddk.pipeline.plan import PipelinePlan
    from megatron_ddk.pipeline.stages import data_stages

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "c.jsonl", [{"text": "hello", "meta": {"redpajama_set_name": "a"}}])
    want = {"mixed_file": ["--domain-field", "meta.redpajama_set_name", "--min-domain-documents",
                           "8" if smoke else "16", "--small-domains", "other"],
            "auto_domains": ["--domains", "auto:3" if smoke else "auto:3-6", "--cluster-sample",
                             "2000" if smoke else "20000"]}
    for example, flags in want.items():
        cfg = load_pipeline_config(os.path.join(ROOT, "examples", example, "pipeline.yaml"),
                                   smoke=smoke, corpus=str(corpus), out=str(tmp_path / "out"))
        plan = PipelinePlan(cfg)
        plan.check()
        (stage,) = data_stages(plan)
        argv = stage.settings["argv"]
        assert " ".join(flags) in " ".join(argv), (example, argv)
        assert stage.inputs == [str(corpus)]
    bad = os.path.join(ROOT, "examples", "auto_domains", "pipeline.yaml")
    from megatron_ddk.config.loader import ConfigError

    with pytest.raises(ConfigError, match=r"data.cluster.k: got '6-3'"):
        load_pipeline_config(bad, ["data.cluster.k=6-3"], corpus=str(corpus))
