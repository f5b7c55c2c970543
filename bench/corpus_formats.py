"""Documents per second and peak memory of reading a mixed corpus into per-domain spill files
(megatron_ddk/data/preprocessing/sources/prepare.py): the field split (JSONL and Parquet) and
automatic domains (auto:K, hashed TF-IDF + mini-batch k-means fitted on a 20,000-document sample,
then one streaming assignment pass), at 10k and 100k short documents. Tokenizing is not included
(bench/preprocess.py measures it).

    python bench/corpus_formats.py [--sizes 10000,100000] [--k 4] [--doc-chars 400]

The corpus: the Python standard library's .py files, C headers under /usr/include, the licence
texts of /usr/share/common-licenses and Python's help topics (pydoc_data), cut into documents
of about --doc-chars characters at line ends, the four sources interleaved, repeated until
there are enough. Each measurement runs in a fresh process; its peak RSS (ru_maxrss) includes
the interpreter and the imports (numpy, pyarrow, scikit-learn as needed), read as VmHWM.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _pieces(text: str, size: int) -> List[str]:
    out, cur = [], []
    length = 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        length += len(line)
        if length >= size:
            out.append("".join(cur))
            cur, length = [], 0
    return out


def _sources(doc_chars: int, per_source: int) -> Dict[str, List[str]]:
    from pydoc_data.topics import topics

    stdlib = sysconfig.get_paths()["stdlib"]
    files = {"python_code": sorted(glob.glob(os.path.join(stdlib, "*.py"))),
             "c_headers": sorted(glob.glob("/usr/include/**/*.h", recursive=True)),
             "licenses": sorted(p for p in glob.glob("/usr/share/common-licenses/*")
                                if os.path.isfile(p))}
    out = {"english_prose": [p for t in topics.values() for p in _pieces(t, doc_chars)]}
    for name, paths in files.items():
        docs: List[str] = []
        for path in paths:
            with open(path, encoding="utf-8", errors="ignore") as f:
                docs += _pieces(f.read(), doc_chars)
            if len(docs) >= per_source:
                break
        out[name] = docs
    return out


def write_corpus(folder: str, num_docs: int, doc_chars: int) -> Dict[str, str]:
    """corpus.jsonl and corpus.parquet of num_docs records {"text", "meta": {"source"}}."""
    per = _sources(doc_chars, num_docs // 4 + 1)
    names = sorted(per)
    jsonl = os.path.join(folder, "corpus.jsonl")
    rows = []
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(num_docs):
            name = names[i % len(names)]
            docs = per[name]
            row = {"text": docs[(i // len(names)) % len(docs)], "meta": {"source": name}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows.append(row)
    out = {"jsonl": jsonl, "bytes": os.path.getsize(jsonl)}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out["parquet"] = os.path.join(folder, "corpus.parquet")
        pq.write_table(pa.Table.from_pylist(rows), out["parquet"])
        del rows
    except ImportError:
        pass
    return out


def measure(path: str, mode: str, k: int) -> dict:
    """One run in this process (the child): prepare_sources, seconds, peak RSS."""
    from megatron_ddk.data.preprocessing.sources.cluster import ClusterSpec
    from megatron_ddk.data.preprocessing.sources.prepare import SourceOptions, prepare_sources

    opts = SourceOptions(inputs=[path])
    if mode == "cluster":
        opts.cluster = ClusterSpec(k, k)
    else:
        opts.domain_field = "meta.source"
    with tempfile.TemporaryDirectory() as stage:
        start = time.perf_counter()
        prepared = prepare_sources(opts, stage, os.path.join(stage, "none"))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "num_domains": len(prepared.domains)}


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (of this program's own address space;
    ru_maxrss would carry over the forking parent's peak through exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB


def _child(path: str, mode: str, k: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from bench.corpus_formats import measure; "
            "print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-c", code, ROOT, path, mode, str(k)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="documents per corpus")
    p.add_argument("--k", type=int, default=4, help="clusters of the auto:K rows")
    p.add_argument("--doc-chars", type=int, default=400, help="characters per document")
    args = p.parse_args()
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            corpus = write_corpus(folder, n, args.doc_chars)
            runs = [("field split", "jsonl", "field"), ("field split", "parquet", "field"),
                    (f"auto:{args.k}", "jsonl", "cluster")]
            for label, fmt, mode in runs:
                if fmt not in corpus:
                    continue
                got = _child(corpus[fmt], mode, args.k)
                rows.append((label, fmt, n, corpus["bytes"] / 1e6, got))
                print(f"{label} {fmt} {n}: {got}", file=sys.stderr, flush=True)
    print(f"load average before the table: {os.getloadavg()}")
    print("| step | input | documents | MB (JSONL) | seconds | docs/s | peak RSS MB | domains |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, fmt, n, mb, got in rows:
        print(f"| {label} | {fmt} | {n:,} | {mb:.1f} | {got['seconds']:.1f} | "
              f"{n / got['seconds']:,.0f} | {got['peak_rss_mb']:.0f} | {got['num_domains']} |")


if __name__ == "__main__":
    main()
