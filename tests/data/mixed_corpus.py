"""A corpus of four known sources mixed into one list of records, built at test time from text
on the machine (not the demo corpus builder): the Python standard library's .py files, C
headers under /usr/include, roff man pages under /usr/share/man/man1, and the licence texts of
/usr/share/common-licenses (cut into pieces: there are few of them). Each record is
{"text": ..., "meta": {"source": NAME}, "id": N}, the sources interleaved in a fixed order."""

from __future__ import annotations

import glob
import gzip
import json
import os
import sysconfig
from typing import Dict, List

DOC_CHARS = 3000
"""Characters per document (a file's start, or a licence's piece)."""


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read(4 * DOC_CHARS).decode("utf-8", errors="ignore")
    except OSError:
        return ""


def _files() -> Dict[str, List[str]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return {
        "python_code": sorted(p for p in glob.glob(os.path.join(stdlib, "*.py"))),
        "c_headers": sorted(glob.glob("/usr/include/**/*.h", recursive=True)),
        "man_pages": sorted(glob.glob("/usr/share/man/man1/*.1.gz")),
        "licenses": sorted(p for p in glob.glob("/usr/share/common-licenses/*")
                           if os.path.isfile(p)),
    }


def _spread(paths: List[str], count: int) -> List[str]:
    """About `count` paths evenly spread over the sorted list (not the first library's only)."""
    step = max(1, len(paths) // max(1, count))
    return paths[::step]


def _documents(name: str, paths: List[str], per_source: int) -> List[str]:
    docs: List[str] = []
    for path in (paths if name == "licenses" else _spread(paths, 2 * per_source)):
        if name == "licenses":
            with open(path, encoding="utf-8", errors="ignore") as f:
                text = f.read()
            docs += [text[i:i + DOC_CHARS] for i in range(0, len(text), DOC_CHARS)
                     if len(text[i:i + DOC_CHARS].strip()) > 200]
        else:
            text = _read(path)[:DOC_CHARS]
            if len(text.strip()) > 200:
                docs.append(text)
        if len(docs) >= per_source:
            break
    return docs[:per_source]


def mixed_records(per_source: int = 120) -> List[dict]:
    """The records, sources interleaved round-robin; RuntimeError when a source is short."""
    per = {name: _documents(name, paths, per_source) for name, paths in _files().items()}
    for name, docs in per.items():
        if len(docs) < per_source // 2:
            raise RuntimeError(f"mixed test corpus: source {name} has only {len(docs)} documents")
    records, i = [], 0
    while any(per.values()):
        for name in sorted(per):
            if per[name]:
                records.append({"text": per[name].pop(0), "meta": {"source": name}, "id": i})
                i += 1
    return records


def write_jsonl(path, records: List[dict]) -> str:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)
