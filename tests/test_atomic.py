"""Leftover `<path>.tmp<pid>` files of a killed writer are removed by the next writer of the
same output (megatron_ddk/atomic.py and the writers that use it); a live writer's are kept.

The killed writer is a real process: it opens its temporary files, then is SIGKILLed."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from megatron_ddk import atomic
from megatron_ddk.atomic import remove_stale_tmp, stale_tmp_files, write_atomic

KILLED_WRITER = """
import os, sys, time
for path in sys.argv[1:]:
    with open(path.replace("PID", str(os.getpid())), "w") as f:
        f.write("half-written")
print("ready", flush=True)
time.sleep(60)
"""


def killed_writer(*paths):
    """Start a writer that leaves `paths` (PID replaced by its pid), SIGKILL it, return its pid."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, *paths], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return proc.pid


def test_only_dead_writers_files_are_removed(tmp_path):
    out = str(tmp_path / "result.json")
    dead = killed_writer(out + ".tmpPID", out + ".tmpPID.bin", out + ".tmp.PID")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f"result.json.tmp{live.pid}"  # a writer still running
        other = tmp_path / f"other.json.tmp{dead}"  # another output's
        for p in (theirs, other):
            p.write_text("in progress")
        expected = sorted(str(tmp_path / f"result.json{s}") for s in
                          (f".tmp{dead}", f".tmp{dead}.bin", f".tmp.{dead}"))
        assert stale_tmp_files(out) == expected
        write_atomic(out, json.dumps({"a": 1}))
        assert json.load(open(out)) == {"a": 1}
        left = sorted(os.listdir(str(tmp_path)))
        assert left == sorted(["result.json", theirs.name, other.name])
    finally:
        live.kill()
        live.wait()
    pid = os.getpid()
    assert (atomic.tmp_path("x") == f"x.tmp{pid}"
            and atomic.tmp_path("x", ".bin") == f"x.tmp{pid}.bin")


def test_write_atomic_keeps_old_content_when_writing_fails(tmp_path):
    out = str(tmp_path / "a.txt")
    write_atomic(out, "old")
    try:
        write_atomic(out, object())  # not str/bytes: the write itself fails
    except TypeError:
        pass
    assert open(out).read() == "old" and os.listdir(str(tmp_path)) == ["a.txt"]
    assert remove_stale_tmp(str(tmp_path / "missing" / "x")) == []


def test_manifest_dataset_and_metrics_writers_clean_up(tmp_path):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ddk.data.manifest import DomainEntry, DomainManifest, save_manifest
    from megatron_ddk.data.preprocessing.writer import commit_dataset
    from megatron_ddk.training.metrics import RunLogger

    folder = tmp_path / "data"
    folder.mkdir()
    manifest = str(folder / "manifest.yaml")
    prefix = str(folder / "train_text_document")
    metrics = str(tmp_path / "run" / "metrics.jsonl")
    os.makedirs(os.path.dirname(metrics))
    dead = killed_writer(manifest + ".tmpPID", prefix + ".tmpPID.bin", prefix + ".tmpPID.idx",
                         metrics + ".tmpPID")
    # the dataset writer: a real indexed dataset committed into place
    tmp = atomic.tmp_path(prefix)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(512))
    builder.add_document(np.arange(5), [5])
    builder.finalize(tmp + ".idx")
    commit_dataset(tmp, prefix)
    save_manifest(DomainManifest(path=manifest, tokenizer_model="t.model",
                                 tokenizer_hash="sha256:0", vocab_size=512, domains=[
                                     DomainEntry("d", [prefix], prefix, 5, 1, 5, 1)]), manifest)
    assert sorted(os.listdir(str(folder))) == ["manifest.yaml", "train_text_document.bin",
                                               "train_text_document.idx"]
    RunLogger(os.path.dirname(metrics), enabled=True, tensorboard=False).close()
    assert os.listdir(os.path.dirname(metrics)) == ["metrics.jsonl"]
    assert not os.path.exists(f"{metrics}.tmp{dead}")


# ---- whole folders ------------------------------------------------------------------------------

def _dead_pid() -> int:
    """The pid of a process that has exited."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_atomic_folder_replaces_the_whole_folder_or_nothing(tmp_path):
    from megatron_ddk.atomic import atomic_folder

    out = tmp_path / "export"
    with atomic_folder(str(out)) as tmp:
        (tmp_path / tmp / "a.txt").write_text("one")
    assert _tree(out) == {"a.txt": "one"}
    with pytest.raises(RuntimeError):
        with atomic_folder(str(out)) as tmp:
            (tmp_path / tmp / "b.txt").write_text("half")
            raise RuntimeError("killed half-way")
    assert _tree(out) == {"a.txt": "one"}  # the previous version, untouched
    with atomic_folder(str(out)) as tmp:
        (tmp_path / tmp / "b.txt").write_text("two")
    assert _tree(out) == {"b.txt": "two"}  # replaced as a whole: no a.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporaries left


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    from megatron_ddk.atomic import atomic_folder, recover_folder

    out, pid = tmp_path / "tasks", _dead_pid()
    aside = tmp_path / f"tasks.old{pid}"  # swap_folder moved the old version aside, then died
    aside.mkdir()
    (aside / "tasks.json").write_text("old")
    half = tmp_path / f"tasks.tmp{pid}"
    half.mkdir()
    (half / "partial").write_text("x")
    assert sorted(recover_folder(str(out))) == sorted([str(aside), str(half)])
    assert _tree(out) == {"tasks.json": "old"} and not half.exists()
    # an aside copy beside a complete folder is only deleted; a live writer's files are kept
    (tmp_path / f"tasks.old{pid}").mkdir()
    live = tmp_path / f"tasks.tmp{os.getpid()}"
    live.mkdir()
    recover_folder(str(out))
    assert not (tmp_path / f"tasks.old{pid}").exists() and live.exists()
    live.rmdir()
    with atomic_folder(str(out)) as tmp:
        (tmp_path / tmp / "tasks.json").write_text("new")
    assert _tree(out) == {"tasks.json": "new"}
