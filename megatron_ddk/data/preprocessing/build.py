"""Preprocessing: raw documents -> Megatron-Core indexed datasets (.bin/.idx), and the per-domain
train/validation hold-out.

- tokenize_to_datasets: JSONL/.txt files -> one dataset per json key, through the streaming
  engine (engine.py: worker processes, batches in input order, so the bytes written do
  not depend on the worker count). Everything is written under a temporary name and renamed at
  the end (.bin first, .idx last, an older .idx removed first), so a failed or interrupted run
  leaves nothing that looks complete.
- the per-domain hold-out (tokenize_domain / split_domain / build_domain) lives in
  domain_split.py; heldout.py decides it.
- StagedBuild: `megatron-ddk build-domains` writes a whole build under <out>/.staging-<pid> and
  swaps it in only when every domain succeeded, so a failed rebuild leaves the previous manifest and
  datasets byte for byte; staging folders of killed builds are removed by the next build.

Imports megatron.core lazily (only to read datasets back); from megatron_ddk: atomic,
data.megatron_tokenizers and data.preprocessing's engine, progress and writer, nothing from other
layers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ddk.atomic import pid_alive
from megatron_ddk.data.preprocessing.writer import remove_quietly

logger = logging.getLogger(__name__)


@dataclass
class PreprocessResult:
    """What tokenize_to_datasets wrote."""

    prefixes: Dict[str, str]
    """Output prefix (no .bin/.idx) per json key."""

    num_documents: Dict[str, int] = field(default_factory=dict)
    """Documents written per json key."""

    num_tokens: Dict[str, int] = field(default_factory=dict)
    """Tokens written per json key, EOD tokens included."""

    num_empty_skipped: int = 0
    """Empty documents (text "") skipped, summed over keys."""

    num_malformed_skipped: int = 0
    """Malformed lines skipped (only with skip_malformed)."""

    seconds: float = 0.0
    """Wall time of the run (after the one-off imports and tokenizer load)."""


def tokenize_to_datasets(
    paths: Sequence[str],
    prefixes: Dict[str, str],
    tokenizer_model: str,
    workers: int = 1,
    append_eod: bool = True,
    skip_malformed: bool = False,
    progress: bool = False,
    eos_token: Optional[str] = None,
    allow_empty: bool = False,
    max_piece_bytes: int = 0,
) -> PreprocessResult:
    """Tokenize the documents of `paths` (in order) into one dataset per json key.

    prefixes maps each json key to its output prefix. Empty documents are skipped and counted;
    a malformed line raises ValueError naming file:line unless skip_malformed; inputs without
    any document with text raise engine.EmptyInputError (a ValueError) naming them,
    nothing written, unless allow_empty. eos_token is for a Hugging Face tokenizer that names no
    end-of-document token. max_piece_bytes > 0 cuts longer documents into pieces, one sequence
    each (engine.EncodeJob.max_piece_bytes). Runs the streaming engine
    (engine.py) with the tokenizer picked from the model file.
    """
    from megatron_ddk.data.megatron_tokenizers import TokenizerSpec
    from megatron_ddk.data.preprocessing.engine import EncodeJob, run_encode
    from megatron_ddk.data.preprocessing.progress import Progress

    job = EncodeJob(paths=list(paths), prefixes=dict(prefixes),
                    tokenizer=TokenizerSpec("auto", tokenizer_model, eos_token=eos_token),
                    append_eod=append_eod, workers=workers, keep_empty=False,
                    skip_malformed=skip_malformed, allow_empty=allow_empty,
                    max_piece_bytes=max_piece_bytes)
    bar = Progress(bar=True, desc=os.path.basename(next(iter(prefixes.values()), ""))) \
        if progress else None
    try:
        stats = run_encode(job, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if stats.num_malformed_skipped:
        logger.warning("skipped %d malformed lines (first: %s)", stats.num_malformed_skipped,
                       stats.first_malformed)
    return PreprocessResult(
        prefixes=dict(prefixes), num_documents=stats.num_documents, num_tokens=stats.num_tokens,
        num_empty_skipped=stats.num_empty, num_malformed_skipped=stats.num_malformed_skipped,
        seconds=stats.seconds)


def select_validation_documents(lengths: np.ndarray, target_tokens: int, seed: int,
                                where: str = "domain") -> np.ndarray:
    """Sorted ids of whole documents, taken in a seeded random order until their lengths sum to
    >= target_tokens. ValueError when that needs every document (nothing left to train on).
    (The valid half of heldout.plan_split, which also draws the test set.)"""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if lengths.size == 0 or total == 0:
        raise ValueError(f"{where} is empty (no documents with tokens)")
    order = np.random.default_rng(seed).permutation(lengths.size)
    cumulative = np.cumsum(lengths[order])
    num_valid = int(np.searchsorted(cumulative, target_tokens)) + 1
    if num_valid >= lengths.size:
        raise ValueError(
            f"{where}: validation needs {target_tokens} tokens but the domain has only {total} "
            f"tokens in {lengths.size} documents, so nothing would be left for training; lower "
            "--valid-samples / --valid-seq-length or add data")
    return np.sort(order[:num_valid])


STAGING_PREFIX = ".staging-"
"""build_domains stages a build in <output-dir>/.staging-<pid> and swaps it in at the end."""


SWAP_JOURNAL = "swap.jsonl"
"""In a staging folder: one JSON line per file swap_in moved ({"final", "aside", "staged"}),
written and synced before the move, then a line {"done": true} once the new manifest is in."""


def _journal(folder: str) -> Tuple[List[dict], bool]:
    """(the moves a build's swap journal records, whether it says the swap completed)."""
    path = os.path.join(folder, SWAP_JOURNAL)
    moves, done = [], False
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # the line being written when the build was killed
                    break
                done = done or bool(rec.get("done"))
                if "final" in rec:
                    moves.append(rec)
    return moves, done


def _put_back(final: str, aside: Optional[str]) -> None:
    """Drop what is at `final` (file or folder) and move its old version `aside` back."""
    if os.path.isdir(final) and not os.path.islink(final):
        shutil.rmtree(final, ignore_errors=True)
    else:
        remove_quietly(final)
    if aside is not None:
        os.replace(aside, final)


def _undo(moves: List[dict]) -> None:
    """Put back what an interrupted swap moved, newest first (the old build returns whole)."""
    for rec in reversed(moves):
        final, aside = rec["final"], rec.get("aside")
        if aside is not None and not os.path.lexists(aside):
            continue  # recorded, killed before the move: nothing to undo
        if rec.get("staged") or aside is not None:
            _put_back(final, aside)


def remove_stale_staging(out_dir: str) -> List[str]:
    """Delete the staging folders of builds that are no longer running (killed); returns them.
    A build killed in the middle of its swap (its journal not done) is rolled back first, so
    the previous manifest and datasets are in place again."""
    removed = []
    try:
        names = os.listdir(out_dir)
    except OSError:
        return removed
    for name in sorted(names):
        pid = name[len(STAGING_PREFIX):]
        full = os.path.join(out_dir, name)
        if (name.startswith(STAGING_PREFIX) and pid.isdigit() and not pid_alive(int(pid))
                and os.path.isdir(full)):
            moves, done = _journal(full)
            if moves and not done:
                _undo(moves)
                logger.warning("rolled back the interrupted swap of %s: the previous build is "
                               "in place", full)
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
            logger.info("removed %s, left by a build that is no longer running", full)
    return removed


class StagedBuild:
    """A build written under <out_dir>/.staging-<pid> and moved into <out_dir> only when it is
    complete (swap_in), so a failed or interrupted rebuild leaves the previous one untouched.

    swap_in moves the old files aside (into the staging folder), renames the new ones into place
    (the old manifest first aside, the new manifest written last by the caller) and rolls the
    old ones back if a rename fails; close() removes the staging folder with whatever it holds.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = os.path.abspath(out_dir)
        remove_stale_staging(self.out_dir)
        self.folder = os.path.join(self.out_dir, f"{STAGING_PREFIX}{os.getpid()}")
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder)
        self._old = os.path.join(self.folder, ".previous")
        self._moved: List[Tuple[str, Optional[str]]] = []  # (final path, its old file aside)
        self._outside: List[str] = []  # old files set aside outside out_dir

    def final(self, staged: str) -> str:
        """The final path of a path under the staging folder."""
        return os.path.join(self.out_dir, os.path.relpath(staged, self.folder))

    def _aside(self, path: str) -> Optional[str]:
        """Move an existing final file aside: into the staging folder when it lies under
        out_dir (same file system), else beside itself as <path>.tmp<pid>.previous (which the
        next writer of `path` removes if this process is killed)."""
        if not os.path.lexists(path):
            return None
        if os.path.commonpath([self.out_dir, os.path.abspath(path)]) == self.out_dir:
            aside = os.path.join(self._old, f"{len(self._moved)}_{os.path.basename(path)}")
            os.makedirs(self._old, exist_ok=True)
        else:
            aside = f"{path}.tmp{os.getpid()}.previous"
            self._outside.append(aside)
        os.replace(path, aside)
        return aside

    def swap_in(self, moves: Sequence[Tuple[Optional[str], str]]) -> None:
        """Apply (staged file or None, final path) in order: the final path's old file goes
        aside, the staged file (if any) takes its place. All or nothing on an exception."""
        try:
            for staged, final in moves:
                self._log({"final": final, "aside": self._aside_name(final),
                           "staged": staged is not None})
                self._moved.append((final, self._aside(final)))
                if staged is not None:
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.replace(staged, final)
        except BaseException:
            self.roll_back()
            raise

    def _aside_name(self, path: str) -> Optional[str]:
        """Where _aside will move `path` (None when there is nothing to move)."""
        if not os.path.lexists(path):
            return None
        if os.path.commonpath([self.out_dir, os.path.abspath(path)]) == self.out_dir:
            return os.path.join(self._old, f"{len(self._moved)}_{os.path.basename(path)}")
        return f"{path}.tmp{os.getpid()}.previous"

    def _log(self, rec: dict) -> None:
        """Append one line to the swap journal, synced before the move it announces."""
        with open(os.path.join(self.folder, SWAP_JOURNAL), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def mark_done(self) -> None:
        """The new build is complete (its manifest written): a later clean-up must not undo it."""
        self._log({"done": True})

    def roll_back(self) -> None:
        """Put every old file swap_in moved aside back in place (the new ones are dropped)."""
        for final, aside in reversed(self._moved):
            _put_back(final, aside)
        self._moved.clear()

    def close(self) -> None:
        """Remove the staging folder (unused staged files and the old files set aside)."""
        for aside in self._outside:
            if os.path.isdir(aside) and not os.path.islink(aside):
                shutil.rmtree(aside, ignore_errors=True)
            else:
                remove_quietly(aside)
        shutil.rmtree(self.folder, ignore_errors=True)
