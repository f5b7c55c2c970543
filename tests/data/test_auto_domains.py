"""Automatic domains (build_domains --domains auto:K): on four known sources mixed into one file
(tests/data/mixed_corpus.py, text on this machine) the clusters recover the sources (adjusted
Rand index >= 0.8, sklearn.metrics); the assignment is deterministic, keyed by file and line and
reused by a rebuild; a range of K reports a silhouette per K; the report names sizes, terms,
excerpts and names; an empty cluster is refused after refits, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ddk.commands import build_domains
from megatron_ddk.data.preprocessing.sources.cluster import (
    ClusterSpec,
    EmptyClusterError,
    fit_k,
    parse_auto,
)
from megatron_ddk.data.preprocessing.sources.labels import SmallDomainRule
from megatron_ddk.data.preprocessing.sources.prepare import SourceOptions, prepare_sources
from tests.data.mixed_corpus import mixed_records, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    records = mixed_records(per_source=120)
    path = write_jsonl(folder / "unlabeled.jsonl", [{"text": r["text"]} for r in records])
    return path, [r["meta"]["source"] for r in records]


def _assignment(folder):
    rows = np.load(os.path.join(folder, "cluster_assignment.npy"))
    meta = json.load(open(os.path.join(folder, "cluster_assignment.json")))
    return rows, meta


def test_clusters_recover_the_known_sources(tmp_path, corpus):
    from sklearn.metrics import adjusted_rand_score

    path, truth = corpus
    opts = SourceOptions(inputs=[path], cluster=ClusterSpec(4, 4, sample=20000))
    for run in ("a", "b"):
        stage = tmp_path / run
        stage.mkdir()
        prepared = prepare_sources(opts, str(stage), str(tmp_path / "none"))
        assert [d.name for d in prepared.domains] == [f"cluster_0{i}" for i in range(4)]
    rows, meta = _assignment(tmp_path / "a")
    ari = adjusted_rand_score(truth, rows["domain"])
    print(f"adjusted Rand index, auto:4 on 4 sources x {len(truth) // 4} documents: {ari:.3f}")
    assert ari >= 0.8
    # keyed by file and line (the JSONL has one record a line), deterministic
    assert rows["file"].tolist() == [0] * len(truth)
    assert rows["record"].tolist() == list(range(1, len(truth) + 1))
    assert np.array_equal(rows, _assignment(tmp_path / "b")[0])
    assert meta["k"] == 4 and meta["num_documents"] == len(truth)
    report = json.load(open(tmp_path / "a" / "clusters.json"))
    assert sum(c["num_documents"] for c in report["clusters"]) == len(truth)
    for c in report["clusters"]:
        assert len(c["excerpts"]) == 3 and len(c["top_terms"]) >= 3 and c["suggested_name"]
    assert "## cluster_00" in (tmp_path / "a" / "clusters.md").read_text()


def test_a_range_reports_a_silhouette_per_k(tmp_path, corpus):
    path, _truth = corpus
    opts = SourceOptions(inputs=[path], cluster=ClusterSpec(3, 5, sample=300, restarts=2),
                         small=SmallDomainRule(0))
    prepared = prepare_sources(opts, str(tmp_path), str(tmp_path / "none"))
    report = json.load(open(tmp_path / "clusters.json"))
    scores = report["silhouette"]
    assert sorted(scores) == ["3", "4", "5"] and all(-1 <= s <= 1 for s in scores.values())
    assert report["k"] == len(prepared.domains)
    assert scores[str(report["k"])] == max(scores.values())  # the best K is the one used
    assert report["num_sample_documents"] == 300
    assert any("silhouette" in line for line in prepared.lines)


def test_build_reuses_the_assignment_and_maps_names(tmp_path, tiny_tokenizer, corpus):
    path, _ = corpus
    out = tmp_path / "out"
    argv = ["--input", path, "--domains", "auto:4", "--output-dir", str(out),
            "--tokenizer-model", tiny_tokenizer, "--valid-samples", "2", "--valid-seq-length",
            "256", "--workers", "1", "--min-heldout-documents", "2", "--max-piece-bytes", "256",
            "--cluster-sample", "200"]
    assert build_domains.main(argv) == 0
    first = _assignment(out)
    assert build_domains.main(argv + ["--domain-map", "cluster_00=first"]) == 0
    rows, meta = _assignment(out)
    assert np.array_equal(rows, first[0]) and meta == first[1]
    import yaml

    names = [d["name"] for d in yaml.safe_load(open(out / "manifest.yaml"))["domains"]]
    assert names == ["cluster_01", "cluster_02", "cluster_03", "first"]
    report = json.load(open(out / "clusters.json"))
    assert report["clusters"][0]["domain"] == "first"


def test_empty_cluster_is_refused_after_refits():
    from sklearn.feature_extraction.text import TfidfVectorizer

    x = TfidfVectorizer().fit_transform(["same words here", "other words there"] * 20)
    with pytest.raises(EmptyClusterError, match=r"seeds \[7, 8, 9\] \(refitted 2 times\); "
                       "refusing: the 40 sampled documents have 2 distinct"):
        fit_k(x, 3, ClusterSpec(3, 3, seed=7, restarts=3))


def test_bad_k_is_named(tmp_path):
    for spec in ("auto:1", "auto:5-3", "auto:x"):
        with pytest.raises(ValueError, match="expected auto:K or auto:A-B"):
            parse_auto(spec)
    assert parse_auto("auto:4-12") == (4, 12) and parse_auto("a,b") is None
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": "same words here"},
                                                {"text": "other words there"}] * 20)
    res = subprocess.run([sys.executable, "-m", "megatron_ddk.cli", "build-domains", "--input",
                          path, "--domains", "auto:3", "--output-dir", str(tmp_path / "out"),
                          "--tokenizer-model", "unused.model"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "k-means left a cluster empty" in lines[0] and "refusing" in lines[0]
