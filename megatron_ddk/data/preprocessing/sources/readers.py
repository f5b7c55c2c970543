"""Input files of a corpus, in every format users have, as one stream of records.

Formats (by suffix; a folder is looked through):
- JSONL (.jsonl, .json; also .jsonl.gz / .jsonl.zst): one JSON object per line, blank lines
  ignored; a record is the object.
- plain text (.txt, .txt.gz, .txt.zst): one document per line (its "\\n" / "\\r\\n" dropped); a
  record is the line's text.
- Parquet (.parquet, or a folder of them): a record is a row, as a mapping (struct columns are
  nested mappings); read a batch of rows at a time, only the columns asked for.
- `datasets.save_to_disk` folder (state.json + data-*.arrow, Arrow IPC streams): rows as for
  Parquet, read with pyarrow.ipc batch by batch; the `datasets` package is not needed.

Every record carries its file and its number there (1-based line for line formats, 1-based row
for columnar ones): errors name it, and the cluster assignment is keyed by it. Memory is one
line or one batch of rows at a time.

Cheap to import: pyarrow and zstandard are imported when a file needs them (config/optional.py).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from megatron_ddk.config.optional import require_extra
from megatron_ddk.data.preprocessing.corpus import MalformedLineError, ReadCounts, parse_record

LINE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
"""Line formats by suffix (before any .gz / .zst)."""

COMPRESSIONS = (".gz", ".zst")
"""Compressed line files: gzip (standard library), zstd (the zstandard package)."""

BATCH_ROWS = 1024
"""Rows per batch read from Parquet and Arrow files."""

Record = Union[dict, str]


@dataclass(frozen=True)
class SourceFile:
    """One input file and how to read it."""

    path: str
    """Absolute path."""

    fmt: str
    """'jsonl', 'txt', 'parquet' or 'arrow'."""

    compression: str = ""
    """'', 'gz' or 'zst' (line formats only)."""

    def where(self, number: int) -> str:
        """'file:line' (line formats) or 'file: row N' (columnar) of a record."""
        return f"{self.path}:{number}" if self.fmt in ("jsonl", "txt") else \
            f"{self.path}: row {number}"


def file_format(path: str) -> Optional[SourceFile]:
    """The SourceFile of a path by its suffix, or None for an unsupported suffix."""
    lower, compression = path.lower(), ""
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            lower, compression = lower[:-len(suffix)], suffix[1:]
    stem, ext = os.path.splitext(lower)
    if ext in LINE_SUFFIXES:
        return SourceFile(os.path.abspath(path), LINE_SUFFIXES[ext], compression)
    if not compression and ext in (".parquet", ".arrow"):
        return SourceFile(os.path.abspath(path), ext[1:])
    return None


def _arrow_folder(folder: str) -> List[SourceFile]:
    """The data files of a save_to_disk folder, in state.json's order."""
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    names = [d["filename"] for d in state.get("_data_files", [])]
    if not names:
        raise ValueError(f"{folder}/state.json lists no _data_files; is this a "
                         "datasets.save_to_disk folder?")
    return [SourceFile(os.path.abspath(os.path.join(folder, n)), "arrow") for n in names]


def _folder_files(folder: str) -> List[SourceFile]:
    """Data files under a folder (sorted, recursive; .json summaries skipped); a save_to_disk
    folder is read as one dataset."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))
        raise ValueError(f"input {folder} is a datasets DatasetDict (splits {splits}); give "
                         f"one split's folder, e.g. "
                         f"{os.path.join(folder, splits[0] if splits else 'train')}")
    if os.path.isfile(os.path.join(folder, "state.json")):
        return _arrow_folder(folder)
    out: List[SourceFile] = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if os.path.isdir(full):
            out += _folder_files(full)
        elif not entry.lower().endswith(".json"):
            found = file_format(full)
            out += [found] if found else []
    return out


def _expand_one(spec: str) -> List[SourceFile]:
    if os.path.isdir(spec):
        found = _folder_files(spec)
        if not found:
            raise ValueError(f"input folder {spec} holds no data files (.jsonl, .jsonl.gz, "
                             ".jsonl.zst, .txt, .parquet, or a datasets.save_to_disk folder)")
        return found
    if os.path.isfile(spec):
        found = file_format(spec)
        if found is None:
            raise ValueError(f"input file {spec}: unsupported suffix; use .jsonl/.json (.gz, "
                             ".zst), .txt (.gz, .zst), .parquet, .arrow or a folder of them")
        return [found]
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise ValueError(f"input {spec} is neither a file nor a folder and matches no file as "
                         "a glob")
    return [f for m in matches for f in _expand_one(m)]


def expand_inputs(specs: Sequence[str]) -> List[SourceFile]:
    """Every input file of files, folders and globs, in the order given (a glob and a folder
    sorted); a file named twice is read once."""
    out, seen = [], set()
    for spec in specs:
        for found in _expand_one(spec):
            if found.path not in seen:
                seen.add(found.path)
                out.append(found)
    return out


def fingerprint(files: Sequence[SourceFile]) -> List[list]:
    """[path, size, mtime_ns] of every input file (what says an assignment is still valid)."""
    return [[f.path, os.path.getsize(f.path), os.stat(f.path).st_mtime_ns] for f in files]


def _open_lines(source: SourceFile):
    if source.compression == "gz":
        return gzip.open(source.path, "rb")
    if source.compression == "zst":
        zstd = require_extra("zstandard", f"input {source.path} (zstd)")
        raw = open(source.path, "rb")
        return io.BufferedReader(zstd.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True))
    return open(source.path, "rb")


def _line_records(source: SourceFile) -> Iterator[Tuple[int, Union[Record, Exception]]]:
    with _open_lines(source) as f:
        for number, raw in enumerate(f, start=1):
            try:
                record = parse_record(raw, source.fmt)
            except MalformedLineError as err:
                yield number, err
                continue
            if record is not None:
                yield number, record


def _batches(source: SourceFile, columns: Optional[Sequence[str]]):
    """Record batches of a Parquet or Arrow file, only `columns` (all when one is absent)."""
    if source.fmt == "parquet":
        pq = require_extra("pyarrow.parquet", f"Parquet input {source.path}")
        pf = pq.ParquetFile(source.path)
        names = pf.schema_arrow.names
        cols = list(columns) if columns and all(c in names for c in columns) else None
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)
        return
    pa = require_extra("pyarrow", f"Arrow input {source.path}")
    with pa.memory_map(source.path) as mm:
        try:
            reader = pa.ipc.open_stream(mm)
        except pa.ArrowInvalid:  # the Arrow file (random access) format
            mm.seek(0)
            reader = pa.ipc.open_file(mm)
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in reader:
            names = batch.schema.names
            cols = list(columns) if columns and all(c in names for c in columns) else None
            for start in range(0, batch.num_rows, BATCH_ROWS):
                part = batch.slice(start, BATCH_ROWS)
                yield part.select(cols) if cols else part


def _row_records(source: SourceFile, columns) -> Iterator[Tuple[int, Record]]:
    number = 0
    for batch in _batches(source, columns):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def iter_records(files: Sequence[SourceFile], columns: Optional[Sequence[str]] = None,
                 skip_malformed: bool = False, counts: Optional[ReadCounts] = None,
                 ) -> Iterator[Tuple[int, int, Record]]:
    """(file index, record number, record) of every file in order. A malformed line raises
    MalformedLineError naming file and line, or is skipped and counted with skip_malformed.
    `columns`: the top-level fields needed (Parquet / Arrow read only those)."""
    counts = counts if counts is not None else ReadCounts()
    for index, source in enumerate(files):
        rows = _line_records(source) if source.fmt in ("jsonl", "txt") else \
            _row_records(source, columns)
        for number, record in rows:
            if isinstance(record, Exception):
                where = f"{source.where(number)}: {record}"
                if not skip_malformed:
                    raise MalformedLineError(f"{where}; fix the line or pass --skip-malformed "
                                             "to skip such lines")
                counts.num_malformed_skipped += 1
                counts.first_malformed = counts.first_malformed or where
                continue
            yield index, number, record


MISSING = object()
"""lookup's result for a path that is not in the record."""


def lookup(record: Record, dotted: str):
    """The value at a dotted path (`meta.redpajama_set_name`) of a record, or MISSING. A key
    that itself holds dots is found too; a step whose value is a JSON object written as a string
    (some Parquet exports of `meta`) is parsed."""
    if not isinstance(record, dict):
        return MISSING
    if dotted in record:
        return record[dotted]
    head, _, rest = dotted.partition(".")
    if not rest or head not in record:
        return MISSING
    value = record[head]
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return MISSING
    return lookup(value, rest)


def record_text(record: Record, text_key: str) -> str:
    """The document of a record (a txt line is its own text); MalformedLineError (without the
    file and line, which the caller adds) for a missing or non-string text field."""
    if isinstance(record, str):
        return record
    if text_key not in record:
        raise MalformedLineError(f"text field {text_key!r} missing (fields present: "
                                 f"{sorted(record)[:8]}); name the text field with --text-key")
    value = record[text_key]
    if not isinstance(value, str):
        raise MalformedLineError(f"text field {text_key!r} is {type(value).__name__}, expected "
                                 "a string")
    return value
