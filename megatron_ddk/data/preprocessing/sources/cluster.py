"""Automatic domains: documents clustered into K domains (`--domains auto:K` or `auto:A-B`).

Features are hashed TF-IDF (scikit-learn HashingVectorizer on each document's first
`max_chars` characters, sublinear TfidfTransformer fitted on the sample, L2-normalised rows);
the clustering is MiniBatchKMeans, seeded. Three bounded steps:

1. one streaming pass counts the documents and draws a reservoir sample of `sample` of them
   (seeded; memory: sample x max_chars characters);
2. k-means is fitted on the sample for each K of the range; a fit that leaves a cluster empty
   is refitted with the next seed; of `restarts` seeded fits the one with the lowest inertia
   is kept (mini-batch k-means lands in different local minima per seed), and when every one
   leaves a cluster empty the K is refused (EmptyClusterError).
   For a range the sampled silhouette score of every K is computed and the best K taken;
3. one streaming pass assigns every document (batches of `batch_size`), writing its domain to
   the assignment (a structured .npy, memory-mapped: file index, record number, domain) and
   its text to the domain's spill file.

The same inputs (paths, sizes, modification times), text field and settings give the same
assignment; a rebuild that finds a matching assignment beside the manifest reads it instead of
fitting again (AssignmentFile). scikit-learn is the optional extra "cluster".
"""

from __future__ import annotations

import logging
import random
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ddk.config.optional import require_extra

logger = logging.getLogger(__name__)

TOKEN_PATTERN = r"(?u)\b\w\w+\b|[^\w\s]+"
"""Words of two or more word characters (scikit-learn's default) and runs of punctuation, so
`#include`, `):`, `\\fB` or `*/` tell code, markup and prose apart (measured on the test
corpus of tests/data/mixed_corpus.py: adjusted Rand index 0.98 with, 0.6-0.9 without)."""

ASSIGNMENT_DTYPE = np.dtype([("file", "<u4"), ("record", "<u8"), ("domain", "<u2")])
"""One row per document, in input order: input file index, its line / row number, cluster."""


class EmptyClusterError(ValueError):
    """k-means left a cluster without documents for every seed tried."""


@dataclass
class ClusterSpec:
    """How documents are clustered into domains (module docstring)."""

    k_min: int
    """Fewest clusters tried (auto:K gives k_min = k_max = K)."""

    k_max: int
    """Most clusters tried; for a range the K with the best silhouette score is used."""

    sample: int = 20000
    """Documents the features and k-means are fitted on (a seeded reservoir sample)."""

    seed: int = 1234
    """Seed of the sample, k-means and the silhouette subsample."""

    max_chars: int = 4000
    """Characters of each document's start that make its features."""

    n_features: int = 2 ** 18
    """Hashed feature dimensions."""

    batch_size: int = 1024
    """Documents per batch of the assignment pass (and k-means' mini-batch size)."""

    restarts: int = 5
    """Seeded fits per K (seed, seed + 1, ...): the lowest inertia without an empty cluster is
    kept; when each leaves a cluster empty the K is refused."""

    silhouette_sample: int = 3000
    """Sample documents the silhouette score of each K is computed on."""

    def describe(self) -> str:
        """'auto:K' or 'auto:A-B'."""
        k = str(self.k_min) if self.k_min == self.k_max else f"{self.k_min}-{self.k_max}"
        return f"auto:{k}"


_AUTO = re.compile(r"^auto:(\d+)(?:-(\d+))?$")


def parse_auto(spec: Optional[str]) -> Optional[Tuple[int, int]]:
    """(k_min, k_max) of 'auto:K' / 'auto:A-B'; None for anything not starting with 'auto'."""
    if not spec or not str(spec).strip().startswith("auto"):
        return None
    match = _AUTO.match(str(spec).strip())
    low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not match or low < 2 or high < low:
        raise ValueError(f"--domains {spec!r}: expected auto:K or auto:A-B with 2 <= A <= B "
                         "(e.g. auto:5 or auto:4-12)")
    return low, high


def reservoir_sample(texts: Iterable[str], size: int, seed: int) -> Tuple[int, List[int],
                                                                          List[str]]:
    """(documents seen, positions, texts) of a seeded uniform sample of `size` (Algorithm R),
    in input order."""
    rng = random.Random(seed)
    keep: List[Tuple[int, str]] = []
    seen = 0
    for seen, text in enumerate(texts, start=1):
        if len(keep) < size:
            keep.append((seen - 1, text))
        else:
            slot = rng.randrange(seen)
            if slot < size:
                keep[slot] = (seen - 1, text)
    keep.sort()
    return seen, [p for p, _ in keep], [t for _, t in keep]


class Features:
    """Hashed TF-IDF features, fitted on the sample (module docstring)."""

    def __init__(self, spec: ClusterSpec) -> None:
        require_extra("sklearn", "automatic domains (--domains auto:K)")
        from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

        self.spec = spec
        self.hasher = HashingVectorizer(n_features=spec.n_features, alternate_sign=False,
                                        norm=None, token_pattern=TOKEN_PATTERN,
                                        dtype=np.float32)
        self.tfidf = TfidfTransformer(sublinear_tf=True)

    def _cut(self, texts: Sequence[str]) -> List[str]:
        return [t[:self.spec.max_chars] for t in texts]

    def fit_transform(self, texts: Sequence[str]):
        """Fit the IDF weights on the sample; its feature rows."""
        return self.tfidf.fit_transform(self.hasher.transform(self._cut(texts)))

    def transform(self, texts: Sequence[str]):
        """Feature rows of a batch."""
        return self.tfidf.transform(self.hasher.transform(self._cut(texts)))


@dataclass
class Fit:
    """The k-means fit of one K."""

    k: int
    """Clusters."""

    model: object
    """The fitted MiniBatchKMeans."""

    labels: np.ndarray
    """Cluster of every sample document."""

    seed: int
    """The seed of the fit that was kept."""

    silhouette: Optional[float] = None
    """Sampled silhouette score (None when it cannot be computed: a 1-document cluster set)."""

    seeds_tried: List[int] = field(default_factory=list)
    """Every seed tried (more than one when a fit left a cluster empty)."""


def fit_k(x, k: int, spec: ClusterSpec) -> Fit:
    """Fit k-means with K clusters on the sample features, spec.restarts seeds; keep the fit
    of lowest inertia that leaves no cluster empty, refuse when each does (EmptyClusterError)."""
    from sklearn.cluster import MiniBatchKMeans

    best, tried, num_empty = None, [], 0
    for seed in range(spec.seed, spec.seed + spec.restarts):
        tried.append(seed)
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3,
                                batch_size=spec.batch_size)
        with warnings.catch_warnings():  # "fewer distinct points than clusters": handled below
            warnings.simplefilter("ignore")
            model.fit(x)
        labels = np.asarray(model.labels_, dtype=np.int64)
        num_empty = int(np.sum(np.bincount(labels, minlength=k) == 0))
        if num_empty:
            logger.warning("auto:%d: seed %d left %d cluster(s) empty; refitting with seed %d",
                           k, seed, num_empty, seed + 1)
        elif best is None or model.inertia_ < best.model.inertia_:
            best = Fit(k, model, labels, seed)
    if best is None:
        distinct = _distinct_rows(x)
        raise EmptyClusterError(
            f"auto:{k}: k-means left a cluster empty with each of seeds {tried} (refitted "
            f"{len(tried) - 1} times); refusing: the {x.shape[0]} sampled documents have "
            f"{distinct} distinct feature vectors. Lower K (auto:{max(2, min(distinct, k - 1))} "
            "or less), give more varied documents, or name the domains with --domain-field")
    best.seeds_tried = tried
    return best


def _distinct_rows(x) -> int:
    csr = x.tocsr()
    rows = {(tuple(csr.indices[a:b]), tuple(np.round(csr.data[a:b], 6)))
            for a, b in zip(csr.indptr[:-1], csr.indptr[1:])}
    return len(rows)


def silhouette(x, labels: np.ndarray, spec: ClusterSpec) -> Optional[float]:
    """The silhouette score on a seeded subsample of the sample (None when undefined)."""
    from sklearn.metrics import silhouette_score

    n = x.shape[0]
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= n:
        return None
    size = min(n, spec.silhouette_sample)
    return float(silhouette_score(x, labels, sample_size=size, random_state=spec.seed))


def check_k(spec: ClusterSpec, num_documents: int, where: str) -> None:
    """ValueError when the largest K exceeds the documents to cluster."""
    if spec.k_max > num_documents:
        raise ValueError(f"{spec.describe()}: K={spec.k_max} is larger than the {num_documents} "
                         f"documents of {where}; give K <= {num_documents} (a domain needs "
                         "documents)")


def fit_range(texts: Sequence[str], spec: ClusterSpec) -> Tuple[Features, Fit, List[Fit]]:
    """Features and k-means fitted on the sample for every K of the range; (features, the
    chosen fit, every fit). The best silhouette wins a range (the smallest K on a tie)."""
    features = Features(spec)
    x = features.fit_transform(texts)
    fits = []
    for k in range(spec.k_min, spec.k_max + 1):
        fit = fit_k(x, k, spec)
        fit.silhouette = silhouette(x, fit.labels, spec)
        logger.info("auto:%d: silhouette %s (seed %d)", k, fit.silhouette, fit.seed)
        fits.append(fit)
    scored = [f for f in fits if f.silhouette is not None]
    best = max(scored, key=lambda f: (f.silhouette, -f.k)) if scored and len(fits) > 1 \
        else fits[0]
    return features, best, fits


def predict(features: Features, fit: Fit, texts: Sequence[str]) -> List[int]:
    """The cluster of each document of a batch."""
    return [int(c) for c in fit.model.predict(features.transform(texts))]


def cluster_name(index: int, k: int) -> str:
    """The domain label of cluster `index` (cluster_03): renamed with --domain-map."""
    return f"cluster_{index:0{max(2, len(str(k - 1)))}d}"


def settings_of(spec: ClusterSpec, text_key: str) -> Dict:
    """What an assignment depends on besides its inputs (its reuse key)."""
    out = asdict(spec)
    out.pop("silhouette_sample")
    out["text_key"] = text_key
    return out
