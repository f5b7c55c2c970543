"""The cluster report beside the manifest: clusters.json and clusters.md.

Per cluster: its domain name, documents (whole corpus and sample), top terms, a suggested name
and three short excerpts; for a range of K the sampled silhouette score of each K and which was
chosen. Top terms come from a TfidfVectorizer with a real vocabulary (English stop words
dropped) fitted on the sample alone, since hashed features have no words: a cluster's terms are
the largest entries of its sample documents' mean TF-IDF row. The suggested name joins the first
two terms ("license_software"); rename clusters with --domain-map cluster_00=NAME.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np

from megatron_ddk.data.preprocessing.corpus import domain_name
from megatron_ddk.data.preprocessing.sources.cluster import ClusterSpec, Fit

NUM_TERMS = 8
"""Top terms listed per cluster."""

NUM_EXCERPTS = 3
"""Excerpts per cluster."""

EXCERPT_CHARS = 160
"""Characters of an excerpt (whitespace collapsed)."""

TERM_PATTERN = r"(?u)\b[^\W\d_]\w+\b"
"""Words that start with a letter: what top terms and suggested names are made of (the
clustering's punctuation tokens would make poor names)."""


@dataclass
class ClusterSummary:
    """One cluster in the report."""

    label: str
    """Its label (cluster_03)."""

    domain: str
    """The domain it became (after --domain-map and the small-domain rule)."""

    num_documents: int
    """Documents assigned to it in the whole corpus."""

    num_sample_documents: int
    """Sample documents in it."""

    top_terms: List[str] = field(default_factory=list)
    """Its most characteristic words."""

    suggested_name: str = ""
    """A name made of its top terms."""

    excerpts: List[str] = field(default_factory=list)
    """The starts of its first sample documents."""


def top_terms(texts: Sequence[str], labels: np.ndarray, k: int) -> List[List[str]]:
    """NUM_TERMS words per cluster from a vocabulary TF-IDF of the sample."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(max_features=50_000, stop_words="english", sublinear_tf=True,
                          token_pattern=TERM_PATTERN, min_df=2 if len(texts) >= 50 else 1)
    try:
        x = vec.fit_transform(texts)
    except ValueError:  # an empty vocabulary (only stop words / punctuation)
        return [[] for _ in range(k)]
    words = vec.get_feature_names_out()
    out = []
    for c in range(k):
        rows = np.flatnonzero(labels == c)
        mean = np.asarray(x[rows].mean(axis=0)).ravel() if rows.size else np.zeros(len(words))
        order = np.argsort(-mean, kind="stable")[:NUM_TERMS]
        out.append([str(words[i]) for i in order if mean[i] > 0])
    return out


def _suggest(terms: List[str], index: int, taken: set) -> str:
    base = domain_name("_".join(terms[:2])) or f"cluster_{index}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def summarize(texts: Sequence[str], fit: Fit, labels: Sequence[str], domains: Sequence[str],
              counts: Sequence[int]) -> List[ClusterSummary]:
    """Every cluster of the chosen fit."""
    terms = top_terms(texts, fit.labels, fit.k)
    taken: set = set()
    out = []
    for c in range(fit.k):
        rows = np.flatnonzero(fit.labels == c)
        excerpts = [" ".join(texts[i].split())[:EXCERPT_CHARS] for i in rows[:NUM_EXCERPTS]]
        out.append(ClusterSummary(labels[c], domains[c], int(counts[c]), int(rows.size),
                                  terms[c], _suggest(terms[c], c, taken), excerpts))
    return out


def report_json(spec: ClusterSpec, chosen: Fit, fits: Sequence[Fit],
                clusters: Sequence[ClusterSummary], num_documents: int,
                num_sample: int) -> str:
    """clusters.json."""
    data = {
        "spec": spec.describe(), "k": chosen.k, "seed": chosen.seed,
        "seeds_tried": chosen.seeds_tried, "num_documents": num_documents,
        "num_sample_documents": num_sample,
        "silhouette": {str(f.k): f.silhouette for f in fits},
        "clusters": [c.__dict__ for c in clusters],
    }
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def report_markdown(spec: ClusterSpec, chosen: Fit, fits: Sequence[Fit],
                    clusters: Sequence[ClusterSummary], num_documents: int,
                    num_sample: int) -> str:
    """clusters.md: the same, for people."""
    lines = [f"# Automatic domains ({spec.describe()})", "",
             f"{num_documents:,} documents; features and k-means fitted on a sample of "
             f"{num_sample:,} (seed {chosen.seed}); K = {chosen.k}.", ""]
    if len(fits) > 1:
        lines += ["| K | silhouette (sampled) |", "|---:|---:|"]
        lines += [f"| {f.k}{' (chosen)' if f is chosen else ''} | "
                  f"{'-' if f.silhouette is None else format(f.silhouette, '.4f')} |"
                  for f in fits]
        lines += ["", "The K with the highest silhouette is used; pass auto:K for another.", ""]
    lines += ["| cluster | domain | documents | sample | suggested name | top terms |",
              "|---|---|---:|---:|---|---|"]
    lines += [f"| {c.label} | {c.domain} | {c.num_documents:,} | {c.num_sample_documents:,} "
              f"| {c.suggested_name} | {', '.join(c.top_terms)} |" for c in clusters]
    for c in clusters:
        lines += ["", f"## {c.label} ({c.suggested_name})", ""]
        lines += [f"- {_md(e)}" for e in c.excerpts]
    lines += ["", "Rename clusters with --domain-map (e.g. "
              f"`{clusters[0].label}={clusters[0].suggested_name}`).", ""]
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def silhouette_table(fits: Sequence[Fit], chosen: Fit) -> List[str]:
    """The lines build_domains prints for a range."""
    return [f"  K={f.k:<3} silhouette "
            f"{'-' if f.silhouette is None else format(f.silhouette, '.4f')}"
            f"{'  <- chosen' if f is chosen else ''}" for f in fits]

