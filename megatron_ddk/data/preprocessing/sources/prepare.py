"""Inputs + options -> the DomainInputs build_domains tokenizes, under its staging folder.

Three ways a record gets its domain, one streaming pass each (two for clustering):
- by file: a per-domain corpus folder whose text field is not `text` (the folder itself, with
  the default field, is tokenized directly and never reaches this module);
- by field: `--domain-field meta.redpajama_set_name`, one value = one domain; a record without
  the field is an error naming file and line unless `--default-domain` names a domain for it;
  a value that is not a string is an error naming file, line and its type;
- by cluster: `--domains auto:K` (cluster.py).
Every document is appended to its domain's spill file <staging>/.sources/<domain>.jsonl
({"text": ...} per line, labels.py), so the rest of the build (byte bounds, tokenizer
training, tokenizing, the held-out split) is the per-domain folder's, unchanged. Memory: one
record (one Parquet / Arrow batch) at a time plus, for clustering, the bounded sample; disk: one
more copy of the text, in the staging folder, removed with it.

Report files (REPORT_FILES) are written to the staging folder and swapped in with the datasets.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ddk.atomic import write_atomic
from megatron_ddk.data.preprocessing.corpus import DomainInput, MalformedLineError, ReadCounts
from megatron_ddk.data.preprocessing.sources import cluster as clu
from megatron_ddk.data.preprocessing.sources import cluster_report
from megatron_ddk.data.preprocessing.sources.labels import (
    SmallDomainRule,
    SpillWriter,
    apply_min_documents,
    label_report,
)
from megatron_ddk.data.preprocessing.sources.readers import (
    MISSING,
    SourceFile,
    expand_inputs,
    fingerprint,
    iter_records,
    lookup,
    record_text,
)

logger = logging.getLogger(__name__)

REPORT_FILES = ("domain_sources.json", "clusters.json", "clusters.md", "cluster_assignment.npy",
                "cluster_assignment.json")
"""Files a build from a mixed corpus writes beside its datasets (those not made are removed)."""

SPILL_FOLDER = ".sources"
"""Spill files' folder under the staging folder."""


@dataclass
class SourceOptions:
    """Where the documents are and how each gets its domain (build_domains' flags)."""

    inputs: List[str]
    """Files, folders and globs (--input, repeatable)."""

    text_key: str = "text"
    """The record field holding the document (--text-key)."""

    domain_field: Optional[str] = None
    """Dotted path of the field naming the domain (--domain-field)."""

    default_domain: Optional[str] = None
    """Domain of records without the field (--default-domain); None: such a record is an
    error."""

    domain_map: Dict[str, str] = field(default_factory=dict)
    """Label -> domain name, renaming or merging labels (--domain-map)."""

    small: SmallDomainRule = field(default_factory=SmallDomainRule)
    """What happens to labels with few documents (--min-domain-documents, --small-domains)."""

    cluster: Optional[clu.ClusterSpec] = None
    """Automatic domains (--domains auto:K)."""

    skip_malformed: bool = False
    """Skip and count malformed lines instead of stopping."""

    by_file: Optional[List[DomainInput]] = None
    """Domains of a per-domain folder read with another text field (set by build_domains)."""


@dataclass
class PreparedSources:
    """What prepare_sources made."""

    domains: List[DomainInput]
    """The domains, each a list of spill files."""

    report_files: List[str] = field(default_factory=list)
    """Staged report files (base names of REPORT_FILES) to swap in beside the datasets."""

    lines: List[str] = field(default_factory=list)
    """What build_domains prints: label -> domain table, silhouettes."""


def _progress(iterable, desc: str, total: Optional[int] = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=" docs", disable=None, mininterval=1.0)


def documents(files: Sequence[SourceFile], opts: SourceOptions, counts: ReadCounts,
              columns: Optional[List[str]] = None) -> Iterator[Tuple[int, int, object, str]]:
    """(file index, record number, record, text) of every document; malformed ones raise
    naming file and line, or are skipped and counted (--skip-malformed)."""
    for index, number, record in iter_records(files, columns, opts.skip_malformed, counts):
        try:
            text = record_text(record, opts.text_key)
        except MalformedLineError as err:
            where = f"{files[index].where(number)}: {err}"
            if not opts.skip_malformed:
                raise MalformedLineError(f"{where}; fix the record or pass --skip-malformed "
                                         "to skip such records") from None
            counts.num_malformed_skipped += 1
            counts.first_malformed = counts.first_malformed or where
            continue
        yield index, number, record, text


def _label_of(record, where: str, opts: SourceOptions) -> str:
    value = lookup(record, opts.domain_field)
    if value is MISSING:
        if opts.default_domain is not None:
            return opts.default_domain
        present = sorted(record)[:8] if isinstance(record, dict) else []
        raise ValueError(f"{where}: domain field {opts.domain_field!r} missing (fields "
                         f"present: {present}); fix --domain-field, or pass --default-domain "
                         "NAME to put records without it in one domain")
    if not isinstance(value, str):
        raise ValueError(f"{where}: domain field {opts.domain_field!r} is "
                         f"{type(value).__name__} ({str(value)[:40]!r}), expected a string; "
                         "point --domain-field at a string field")
    return value


def _split_by_field(files: List[SourceFile], opts: SourceOptions, writer: SpillWriter,
                    counts: ReadCounts) -> None:
    text_files = [f.path for f in files if f.fmt == "txt"]
    if text_files:
        raise ValueError(f"input {text_files[0]} is plain text, which has no fields for "
                         f"--domain-field {opts.domain_field}; give JSONL, Parquet or Arrow "
                         "records, or find domains with --domains auto:K")
    columns = [opts.text_key, opts.domain_field.split(".")[0]]
    for index, number, record, text in _progress(documents(files, opts, counts, columns),
                                                 "split by field"):
        writer.write(_label_of(record, files[index].where(number), opts), text)


def _split_by_file(opts: SourceOptions, writer: SpillWriter, counts: ReadCounts) -> None:
    for domain in opts.by_file:
        files = expand_inputs(domain.paths)
        for _i, _n, _r, text in _progress(documents(files, opts, counts), domain.name):
            writer.write(domain.name, text)


def _finish(writer: SpillWriter, opts: SourceOptions, mode: str, source: str,
            stage_folder: str, counts: ReadCounts) -> PreparedSources:
    writer.close()
    if counts.num_malformed_skipped:
        logger.warning("skipped %d malformed record(s); the first: %s",
                       counts.num_malformed_skipped, counts.first_malformed)
    if not writer.labels:
        raise ValueError(f"inputs {opts.inputs} hold no document")
    domains = apply_min_documents(writer, opts.small)
    report = label_report(writer, mode, source)
    write_atomic(os.path.join(stage_folder, "domain_sources.json"), report.to_json())
    return PreparedSources(domains, ["domain_sources.json"], report.lines())


def prepare_sources(opts: SourceOptions, stage_folder: str, output_dir: str) -> PreparedSources:
    """Spill every document of the inputs into its domain's file (module docstring); report
    files go to stage_folder, an earlier assignment is looked for in output_dir."""
    start = time.perf_counter()
    writer = SpillWriter(os.path.join(stage_folder, SPILL_FOLDER), opts.domain_map)
    counts = ReadCounts()
    try:
        if opts.by_file is not None:
            _split_by_file(opts, writer, counts)
            out = _finish(writer, opts, "file", "file name", stage_folder, counts)
        elif opts.cluster is not None:
            files = expand_inputs(opts.inputs)
            extra = _split_by_cluster(files, opts, writer, counts, stage_folder, output_dir)
            out = _finish(writer, opts, "cluster", opts.cluster.describe(), stage_folder, counts)
            out.report_files += extra.report_files
            out.lines = extra.lines + out.lines
            _write_cluster_report(stage_folder, extra, writer)
        else:
            files = expand_inputs(opts.inputs)
            _split_by_field(files, opts, writer, counts)
            out = _finish(writer, opts, "field", opts.domain_field, stage_folder, counts)
    finally:
        writer.close()
    logger.info("read the inputs into %d domain(s) in %.1fs", len(out.domains),
                time.perf_counter() - start)
    return out


# --- automatic domains -----------------------------------------------------------------------


@dataclass
class _ClusterRun:
    """What the clustering pass leaves for its report."""

    spec: clu.ClusterSpec
    chosen: clu.Fit
    fits: List[clu.Fit]
    texts: List[str]
    labels: List[str]
    counts: np.ndarray
    num_documents: int
    report_files: List[str] = field(default_factory=list)
    lines: List[str] = field(default_factory=list)


def _assignment_key(files, opts: SourceOptions) -> dict:
    return {"version": 1, "inputs": fingerprint(files),
            "settings": clu.settings_of(opts.cluster, opts.text_key)}


def _previous_assignment(output_dir: str, key: dict):
    """The assignment of an earlier build of the same inputs and settings, else None."""
    meta_path = os.path.join(output_dir, "cluster_assignment.json")
    npy_path = os.path.join(output_dir, "cluster_assignment.npy")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in key} != json.loads(json.dumps(key)):
            return None
        rows = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return (meta, rows) if rows.dtype == clu.ASSIGNMENT_DTYPE else None


def _fit(files, opts: SourceOptions, counts: ReadCounts, previous):
    """Pass 1 (count + sample) and the fit, or the earlier assignment's."""
    spec = opts.cluster
    texts = (t[:spec.max_chars] for _i, _n, _r, t in
             _progress(documents(files, opts, counts), "sample"))
    num_docs, positions, sample = clu.reservoir_sample(texts, spec.sample, spec.seed)
    clu.check_k(spec, num_docs, f"inputs {opts.inputs}")
    if previous is not None and previous[0].get("num_documents") == num_docs:
        meta, rows = previous
        labels = np.asarray(rows["domain"][positions], dtype=np.int64)
        chosen = clu.Fit(meta["k"], None, labels, meta["seed"], seeds_tried=meta["seeds_tried"])
        fits = [chosen if int(k) == chosen.k else clu.Fit(int(k), None, labels, meta["seed"])
                for k in meta["silhouette"]]
        for f in fits:
            f.silhouette = meta["silhouette"][str(f.k)]
        logger.info("reusing the cluster assignment of the previous build (same inputs)")
        return None, chosen, fits, num_docs, sample, rows
    features, chosen, fits = clu.fit_range(sample, spec)
    return features, chosen, fits, num_docs, sample, None


def _assigned(files, opts: SourceOptions, counts: ReadCounts, features, chosen: clu.Fit,
              reused) -> Iterator[Tuple[int, int, str, int]]:
    """(file index, record number, text, cluster) of every document: predicted batch by batch,
    or read from the earlier assignment."""
    docs = documents(files, opts, counts)
    if reused is not None:
        for (index, number, _record, text), row in zip(docs, reused):
            assert (int(row["file"]), int(row["record"])) == (index, number), "stale assignment"
            yield index, number, text, int(row["domain"])
        return
    batch: List[Tuple[int, int, str]] = []
    for index, number, _record, text in docs:
        batch.append((index, number, text))
        if len(batch) >= opts.cluster.batch_size:
            yield from _predict(features, chosen, batch)
            batch = []
    yield from _predict(features, chosen, batch)


def _predict(features, chosen: clu.Fit, batch):
    if batch:
        ids = clu.predict(features, chosen, [t for _i, _n, t in batch])
        for (index, number, text), c in zip(batch, ids):
            yield index, number, text, c


def _split_by_cluster(files, opts: SourceOptions, writer: SpillWriter, counts: ReadCounts,
                      stage_folder: str, output_dir: str) -> _ClusterRun:
    """Sample, fit (or reuse), then one pass assigning and spilling every document."""
    spec, key = opts.cluster, _assignment_key(files, opts)
    features, chosen, fits, num_docs, sample, reused = _fit(
        files, opts, counts, _previous_assignment(output_dir, key))
    labels = [clu.cluster_name(c, chosen.k) for c in range(chosen.k)]
    rows = np.lib.format.open_memmap(os.path.join(stage_folder, "cluster_assignment.npy"),
                                     mode="w+", dtype=clu.ASSIGNMENT_DTYPE, shape=(num_docs,))
    sizes = np.zeros(chosen.k, dtype=np.int64)
    stream = _assigned(files, opts, counts, features, chosen, reused)
    for pos, (index, number, text, c) in enumerate(_progress(stream, "assign", num_docs)):
        rows[pos] = (index, number, c)
        sizes[c] += 1
        writer.write(labels[c], text)
    rows.flush()
    del rows
    empty = [labels[c] for c in np.flatnonzero(sizes == 0)]
    if empty:
        raise clu.EmptyClusterError(f"{spec.describe()}: cluster(s) {empty} received no "
                                    "document in the assignment pass; refusing: lower K")
    meta = dict(key, k=chosen.k, seed=chosen.seed, seeds_tried=chosen.seeds_tried,
                num_documents=num_docs, labels=labels, files=[f.path for f in files],
                silhouette={str(f.k): f.silhouette for f in fits})
    write_atomic(os.path.join(stage_folder, "cluster_assignment.json"),
                 json.dumps(meta, indent=1) + "\n")
    run = _ClusterRun(spec, chosen, fits, sample, labels, sizes, num_docs,
                      ["cluster_assignment.npy", "cluster_assignment.json", "clusters.json",
                       "clusters.md"])
    if len(fits) > 1:
        run.lines = [f"{spec.describe()}: sampled silhouette per K"] + \
            cluster_report.silhouette_table(fits, chosen)
    return run


def _write_cluster_report(stage_folder: str, run: _ClusterRun, writer: SpillWriter) -> None:
    domains = [writer.labels[lb].name if lb in writer.labels else lb for lb in run.labels]
    summaries = cluster_report.summarize(run.texts, run.chosen, run.labels, domains, run.counts)
    args = (run.spec, run.chosen, run.fits, summaries, run.num_documents, len(run.texts))
    write_atomic(os.path.join(stage_folder, "clusters.json"), cluster_report.report_json(*args))
    write_atomic(os.path.join(stage_folder, "clusters.md"),
                 cluster_report.report_markdown(*args))
