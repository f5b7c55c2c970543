"""Stage stamps: what makes a pipeline rerun skip, resume or redo a stage.

A stage's key is a hash of its settings and of its inputs (files by path, size and modification
time — make's rule — and the keys of the stages it reads from, so a change reruns everything
after it). <out>/stamps/<stage>.json records the key, the state (running / done), the outputs
and the seconds the stage took. A stage is skipped when its stamp says done with the same key and
every output exists; it resumes (training stages, from their last checkpoint) when the stamp says
running with the same key; anything else starts it fresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Dict, Iterable, List, Optional

from megatron_ddk.atomic import write_atomic


def hash_json(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form (sorted keys)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_fingerprint(paths: Iterable[str]) -> List[List[Any]]:
    """[path, size, mtime_ns] of every file under the given files/folders, sorted by path."""
    rows = []
    for top in paths:
        if os.path.isfile(top):
            files = [top]
        else:
            files = [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
        for path in files:
            st = os.stat(path)
            rows.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return sorted(rows)


class Stamp:
    """The stamp file of one stage."""

    def __init__(self, folder: str, stage: str):
        self.path = os.path.join(folder, stage.replace("/", "_") + ".json")
        self.data: Dict[str, Any] = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    self.data = json.load(f)
            except (OSError, ValueError):
                self.data = {}  # unreadable stamp: the stage reruns

    def state(self, key: str, outputs: List[str]) -> str:
        """'done' (skip), 'running' (resume) or 'new' (start fresh) for this key."""
        if self.data.get("key") != key:
            return "new"
        if self.data.get("state") == "done":
            return "done" if all(os.path.exists(p) for p in outputs) else "new"
        return "running" if self.data.get("state") == "running" else "new"

    @property
    def seconds(self) -> Optional[float]:
        """Seconds the stage took when it last ran to completion (all attempts summed)."""
        return self.data.get("seconds")

    def write(self, **fields) -> None:
        """Update and write the stamp atomically."""
        self.data.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=1))
