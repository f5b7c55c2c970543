"""Build the embedded demo corpus: several domains of real text already on this machine.

No downloads. Candidate sources, in priority order (the first --num-domains that yield at least
--min-mb each are used; a folder missing on some machine just moves on to the next candidate):

  python_code    Python standard-library source (the running interpreter's lib folder)
  english_prose  Python's help topics (pydoc_data) and the GNU info manuals' text
  c_headers      C headers under /usr/include
  licenses       /usr/share/common-licenses and /usr/share/doc/*/copyright, every paragraph
                 kept once (package copyright files repeat the same licence texts)
  unicode_names  the Unicode character table of Python's unicodedata ("U+00C0 LATIN CAPITAL
                 LETTER A WITH GRAVE Lu", one block per document; algorithmically named ranges
                 left out; ASCII only, so small tokenizers need no extra characters):
                 memorisation-heavy (code point -> name), where a larger model's capacity shows
  man_pages      roff man pages (/usr/share/man/man1/*.gz)        -- fallback

The domains share no text: prose holds no docstrings of the code domain, and the licence domain
no repeated paragraph. Each domain becomes <output-dir>/<name>.jsonl, one {"text": ...,
"source": ...} object per source file (files larger than --max-doc-kb split at line boundaries),
files read in sorted order, so the output is deterministic for a given machine. Sizes and a
sha256 per domain go to stdout and to <output-dir>/summary.json.

    megatron-ddk demo-corpus --output-dir data/demo/corpus
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import sysconfig
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from megatron_ddk.console import results
from megatron_ddk.data.preprocessing.pieces import split_document

Doc = Tuple[str, str]  # (source id, text)
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def _walk(root: str, suffixes: Tuple[str, ...]) -> Iterator[str]:
    """Files under root with one of the suffixes, in sorted (deterministic) order."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(suffixes):
                yield os.path.join(folder, name)


def _read_text(path: str, gz: bool = False) -> Optional[str]:
    """The file as UTF-8 text, or None for binary/undecodable/unreadable/blank files."""
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            data = f.read()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    if "\x00" in text or not text.strip():
        return None
    return text


def _files(paths: Iterator[str], gz: bool = False) -> Iterator[Doc]:
    for path in paths:
        text = _read_text(path, gz)
        if text is not None:
            yield path, text


def python_code() -> Iterator[Doc]:
    yield from _files(_walk(sysconfig.get_paths()["stdlib"], (".py",)))


def _docstrings(path: str, source: str) -> str:
    """Module, class and function docstrings of one module, joined by blank lines."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    parts = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(p for p in parts if p and len(p) >= 80)


def english_prose() -> Iterator[Doc]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        if topics[key].strip():
            yield f"pydoc_data.topics:{key}", topics[key]
    yield from gnu_manuals()


def c_headers() -> Iterator[Doc]:
    yield from _files(_walk("/usr/include", (".h",)))


def _license_files() -> Iterator[Doc]:
    root = "/usr/share/common-licenses"
    if os.path.isdir(root):
        yield from _files(os.path.join(root, n) for n in sorted(os.listdir(root)))
    doc = "/usr/share/doc"
    if os.path.isdir(doc):
        yield from _files(os.path.join(doc, n, "copyright") for n in sorted(os.listdir(doc)))


def licenses() -> Iterator[Doc]:
    """Licence texts with every paragraph (blank-line separated, whitespace-normalised) kept
    only the first time it appears."""
    seen = set()
    for source, text in _license_files():
        kept = []
        for para in text.split("\n\n"):
            key = hashlib.sha256(" ".join(para.split()).encode("utf-8")).digest()
            if para.strip() and key not in seen:
                seen.add(key)
                kept.append(para)
        if kept:
            yield source, "\n\n".join(kept) + "\n"


_ALGORITHMIC_NAMES = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HANGUL SYLLABLE",
                      "TANGUT", "KHITAN", "NUSHU", "EGYPTIAN HIEROGLYPH", "YI SYLLABLE")


def unicode_names() -> Iterator[Doc]:
    """One document per 256-code-point block: 'U+XXXX <NAME> <category>' lines."""
    import unicodedata

    for block in range(0, 0x110000, 256):
        lines = []
        for cp in range(block, block + 256):
            name = unicodedata.name(chr(cp), "")
            if not name or name.startswith(_ALGORITHMIC_NAMES):
                continue
            lines.append(f"U+{cp:04X} {name} {unicodedata.category(chr(cp))}\n")
        if lines:
            yield f"unicodedata:{block:06X}", "".join(lines)


def gnu_manuals() -> Iterator[Doc]:
    root = "/usr/share/info"
    if os.path.isdir(root):
        names = sorted(n for n in os.listdir(root) if ".info" in n and n.endswith(".gz"))
        yield from _files((os.path.join(root, n) for n in names), gz=True)


def man_pages() -> Iterator[Doc]:
    root = "/usr/share/man/man1"
    if os.path.isdir(root):
        names = sorted(n for n in os.listdir(root) if n.endswith(".gz"))
        yield from _files((os.path.join(root, n) for n in names), gz=True)


CANDIDATES: Dict[str, Tuple[str, Callable[[], Iterator[Doc]]]] = {
    "python_code": ("Python standard-library source", python_code),
    "english_prose": ("Python help topics and GNU manuals (English prose)", english_prose),
    "c_headers": ("C headers from /usr/include", c_headers),
    "licenses": ("licence texts, each paragraph once (common-licenses, copyright files)",
                 licenses),
    "unicode_names": ("the Unicode character table (unicodedata)", unicode_names),
    "man_pages": ("roff man pages", man_pages),
}


def collect_domain(docs: Iterator[Doc], max_bytes: int, max_doc_bytes: int,
                   desc: str = "") -> List[Dict[str, str]]:
    """Documents (exact duplicates dropped) up to max_bytes; the last one may be the head of a
    longer document (cut at a line boundary) so the domain fills its cap."""
    out, seen, total = [], set(), 0
    with tqdm(total=max_bytes, desc=desc, unit="B", unit_scale=True, leave=False,
              disable=not desc) as bar:
        for source, text in docs:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                continue
            seen.add(digest)
            for i, piece in enumerate(split_document(text, max_doc_bytes)):
                n = len(piece.encode("utf-8"))
                if total + n > max_bytes:  # fill the rest with the head of this piece
                    head = split_document(piece, max_bytes - total)[0] if total < max_bytes else ""
                    if head and len(head.encode("utf-8")) <= max_bytes - total:
                        out.append({"text": head, "source": f"{source}#{i}:head"})
                    return out
                out.append({"text": piece, "source": f"{source}#{i}" if i else source})
                total += n
                bar.update(n)
    return out


def write_jsonl(docs: List[Dict[str, str]], path: str) -> str:
    """Write one JSON object per line (temp file, then rename); return the file's sha256."""
    tmp = f"{path}.tmp{os.getpid()}"
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for doc in docs:
            line = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
            digest.update(line)
            f.write(line)
    os.replace(tmp, path)
    return "sha256:" + digest.hexdigest()


def build_demo_corpus(output_dir: str, num_domains: int = 5, max_mb: float = 1.5,
                      min_mb: float = 0.3, max_doc_kb: float = 32.0,
                      candidates: Optional[List[str]] = None, progress: bool = True,
                      sizes_mb: Optional[List[float]] = None) -> dict:
    """Build the corpus; return the summary (also written to <output_dir>/summary.json).

    sizes_mb: the cap of the first, second, ... domain built (in candidate order), instead of
    max_mb for all; num_domains is then len(sizes_mb), and a source below half its cap (or
    min_mb, the smaller) is skipped, the next candidate taking its place and cap."""
    if sizes_mb is not None:
        if not sizes_mb or any(not x > 0 for x in sizes_mb):
            raise ValueError(f"--sizes-mb {sizes_mb}: give one size > 0 per domain")
        num_domains = len(sizes_mb)
    names = candidates or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown demo domain(s) {unknown}; choose from {list(CANDIDATES)}")
    if min_mb > max_mb:
        raise ValueError(f"--min-mb ({min_mb}) must not exceed --max-mb ({max_mb})")
    os.makedirs(output_dir, exist_ok=True)
    summary = {"max_bytes_per_domain": int(max_mb * 1e6) if sizes_mb is None else
               [int(x * 1e6) for x in sizes_mb], "domains": [], "skipped": []}
    for name in names:
        if len(summary["domains"]) == num_domains:
            break
        description, source = CANDIDATES[name]
        cap = max_mb if sizes_mb is None else sizes_mb[len(summary["domains"])]
        least = min_mb if sizes_mb is None else min(min_mb, cap / 2)
        docs = collect_domain(source(), int(cap * 1e6), int(max_doc_kb * 1024),
                              desc=name if progress else "")
        num_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
        if num_bytes < least * 1e6:
            summary["skipped"].append({"name": name, "reason": f"only {num_bytes} bytes found "
                                       f"(need {int(least * 1e6)})"})
            continue
        path = os.path.join(output_dir, f"{name}.jsonl")
        sha = write_jsonl(docs, path)
        summary["domains"].append({
            "name": name, "description": description, "file": os.path.basename(path),
            "num_documents": len(docs), "num_text_bytes": num_bytes,
            "num_file_bytes": os.path.getsize(path), "sha256": sha})
    if len(summary["domains"]) < num_domains:
        raise ValueError(
            f"only {len(summary['domains'])} demo domains could be built (need {num_domains}); "
            f"skipped: {summary['skipped']}. Lower --min-mb or --num-domains")
    _remove_stale(output_dir, {d["file"] for d in summary["domains"]})
    tmp = os.path.join(output_dir, f"summary.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, "summary.json"))
    return summary


def _remove_stale(output_dir: str, keep: set) -> None:
    """Delete domain files a previous run of this tool wrote that this run did not."""
    old = os.path.join(output_dir, "summary.json")
    if not os.path.isfile(old):
        return
    with open(old) as f:
        previous = json.load(f)
    for d in previous.get("domains", []):
        path = os.path.join(output_dir, d.get("file", ""))
        if d.get("file") and d["file"] not in keep and os.path.isfile(path):
            os.remove(path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="data/demo/corpus", help="where <domain>.jsonl go")
    p.add_argument("--num-domains", type=int, default=5, help="domains to build (>= 4 is the "
                   "demo's contract; up to %d candidates)" % len(CANDIDATES))
    p.add_argument("--max-mb", type=float, default=1.5, help="cap per domain, MB of text")
    p.add_argument("--min-mb", type=float, default=0.3, help="a source with less is skipped")
    p.add_argument("--max-doc-kb", type=float, default=32.0,
                   help="larger source files are split into documents of at most this size")
    p.add_argument("--domains", default=None,
                   help="comma-separated candidates to try, in order (default: all, see above)")
    p.add_argument("--sizes-mb", default=None,
                   help="comma-separated cap per domain built, in order (e.g. 2.0,1.2,0.7,0.5,"
                   "0.3 for a skewed mixture); sets the number of domains, overrides --max-mb")
    args = p.parse_args(argv)
    sizes = None
    if args.sizes_mb:
        try:
            sizes = [float(x) for x in args.sizes_mb.split(",")]
        except ValueError:
            raise ValueError(f"--sizes-mb {args.sizes_mb!r}: expected numbers separated "
                             "by commas") from None
    summary = build_demo_corpus(  # a ValueError: one `error:` line, exit 2 (cli.run_tool)
        args.output_dir, args.num_domains, args.max_mb, args.min_mb, args.max_doc_kb,
        args.domains.split(",") if args.domains else None, sizes_mb=sizes)
    results().info(f"{'domain':<14} {'docs':>6} {'text MB':>8} {'file MB':>8}  sha256")
    for d in summary["domains"]:
        results().info(f"{d['name']:<14} {d['num_documents']:>6} {d['num_text_bytes'] / 1e6:>8.3f} "
                       f"{d['num_file_bytes'] / 1e6:>8.3f}  {d['sha256']}")
    for s in summary["skipped"]:
        results().info(f"skipped {s['name']}: {s['reason']}")
    results().info(f"summary: {os.path.join(args.output_dir, 'summary.json')}")
    return 0

