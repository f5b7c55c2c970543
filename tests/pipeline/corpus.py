"""A 3-domain corpus built at test time from text on the machine that no other test or the demo
corpus uses: Python package descriptions (dist-info METADATA), Debian copyright files, and
Megatron-Core's own Python sources. One file = one document, cut to max_doc_bytes."""

import glob
import json
import os
import site
import sysconfig
from typing import Dict, Optional

import megatron.core


def _sources():
    sites = set(site.getsitepackages() + [sysconfig.get_paths()["purelib"]])
    metadata = sorted(p for s in sites for p in glob.glob(os.path.join(s, "*.dist-info",
                                                                       "METADATA")))
    copyright_files = sorted(glob.glob("/usr/share/doc/*/copyright"))
    mcore = sorted(glob.glob(os.path.join(os.path.dirname(megatron.core.__file__), "**", "*.py"),
                             recursive=True))
    return {"package_docs": metadata, "debian_copyright": copyright_files, "mcore_source": mcore}


def build_corpus(folder: str, max_bytes: int = 200_000, max_doc_bytes: int = 8_000,
                 long_domains: Optional[Dict[str, int]] = None) -> str:
    """Write <folder>/<domain>.jsonl for the three domains; returns folder. A domain named in
    long_domains gets documents of that many bytes instead (its files concatenated), two of
    them at least: a corpus of a few very long documents."""
    os.makedirs(folder, exist_ok=True)
    long_domains = long_domains or {}
    for name, paths in _sources().items():
        doc_bytes = long_domains.get(name)
        cap = max(max_bytes, 2 * doc_bytes) if doc_bytes else max_bytes
        total, pending = 0, ""
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as out:
            for path in paths:
                try:
                    text = open(path, encoding="utf-8", errors="ignore").read()
                except OSError:
                    continue
                if len(text.strip()) < 200:
                    continue
                if doc_bytes:
                    pending += text
                    if len(pending.encode("utf-8")) < doc_bytes:
                        continue
                    text, pending = pending, ""
                else:
                    text = text[:max_doc_bytes]
                out.write(json.dumps({"text": text}) + "\n")
                total += len(text.encode("utf-8"))
                if total >= cap:
                    break
        if total < max_bytes // 4:
            raise RuntimeError(f"test corpus domain {name}: only {total} bytes found")
    return folder
