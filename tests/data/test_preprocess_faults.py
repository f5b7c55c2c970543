"""Preprocessing faults: a worker process that dies (SIGKILL, as the out-of-memory killer sends,
or os._exit) ends the run quickly with an error naming the input lines in flight, never a hang,
and nothing is written; inputs without any document with text are an error naming the file
unless --allow-empty (then an empty dataset Megatron-Core reads)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_ddk.data.preprocessing import engine
from megatron_ddk.data.preprocessing.build import tokenize_to_datasets
from megatron_ddk.data.preprocessing.engine import EmptyInputError, WorkerDiedError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
_REAL_ENCODE = engine.encode_batch


def _killed_at_line_9(batch):
    """encode_batch, except the worker encoding the batch that starts at line 9 is SIGKILLed."""
    if batch[1] == 9:
        os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_ENCODE(batch)


def _exits_at_line_17(batch):
    if batch[1] == 17:
        os._exit(3)
    return _REAL_ENCODE(batch)


@pytest.mark.parametrize("die, message", [
    (_killed_at_line_9, r"in\.jsonl lines 9-\d+: it was killed by SIGKILL, most likely for "
                        r"using too much memory .*try fewer --workers"),
    (_exits_at_line_17, r"in\.jsonl lines (9|17)-\d+: it ended with exit status 3"),
])
def test_dead_worker_is_an_error_naming_the_lines(tmp_path, tiny_tokenizer, make_jsonl,
                                                  make_texts, monkeypatch, die, message):
    monkeypatch.setattr(engine, "BATCH_LINES", 8)  # batches start at lines 1, 9, 17, ...
    monkeypatch.setattr(engine, "encode_batch", die)
    src = make_jsonl(tmp_path / "in.jsonl", make_texts(200, seed=3))
    out = tmp_path / "out"
    start = time.perf_counter()
    with pytest.raises(WorkerDiedError, match="encoding worker process died while encoding "
                       ".*" + message):
        tokenize_to_datasets([src], {"text": str(out / "ds")}, tiny_tokenizer, workers=2)
    assert time.perf_counter() - start < 60
    assert os.listdir(out) == []  # no .bin/.idx, no temporary or spill files
    assert multiprocessing.active_children() == []


def _children(pid: int):
    """Pids whose parent is `pid` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(name))
    return out


def test_cli_worker_sigkilled_from_outside(tmp_path, tiny_tokenizer, make_jsonl, make_texts):
    """preprocess_data.py --workers 2; one worker gets SIGKILL from here as soon as it exists:
    the run exits non-zero within the timeout, says which input, and writes nothing."""
    src = make_jsonl(tmp_path / "big.jsonl", make_texts(20000, seed=5))
    prefix = tmp_path / "out" / "big"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "tools/preprocess_data.py", "--input", src, "--output-prefix",
         str(prefix), "--tokenizer-model", tiny_tokenizer, "--workers", "2", "--append-eod"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        victim, deadline = None, time.time() + 60
        while victim is None and proc.poll() is None and time.time() < deadline:
            kids = _children(proc.pid)
            victim = kids[0] if kids else None
            time.sleep(0.005)
        assert victim is not None, "the run never started a worker"
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: an encoding worker process died while encoding ")
    assert f"{src} lines " in last and "killed by SIGKILL" in last and "--workers" in last
    assert not os.path.exists(prefix.parent) or os.listdir(prefix.parent) == []


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("no_text.jsonl", '{"text": ""}\n' * 3),
    ("empty.txt", ""), ("blank.txt.gz", None)])
def test_empty_input_is_an_error_naming_the_file(tmp_path, tiny_tokenizer, name, content):
    """Megatron-LM's command line (keep_empty: empty documents are written as such) refuses
    inputs without a document with text, before anything is written."""
    from megatron_ddk.data.preprocessing.megatron_cli import build_parser, job_from_args

    path = tmp_path / name
    if content is None:
        import gzip

        with gzip.open(path, "wb") as f:
            f.write(b"\n\n")
    else:
        path.write_text(content)
    args = build_parser().parse_args(["--input", str(path), "--output-prefix",
                                      str(tmp_path / "out" / "x"), "--tokenizer-model",
                                      tiny_tokenizer, "--workers", "1", "--append-eod"])
    with pytest.raises(EmptyInputError, match=f"input {path} holds no document with text"):
        engine.run_encode(job_from_args(args))
    assert os.listdir(tmp_path / "out") == []


def test_cli_empty_input_and_allow_empty(tmp_path, tiny_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = tmp_path / "empty.jsonl"
    path.write_text("")
    prefix = tmp_path / "out" / "e"
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(path), "--output-prefix",
           str(prefix), "--tokenizer-model", tiny_tokenizer, "--workers", "1", "--append-eod"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2  # a user error (docs/commands.md)
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: input {path} holds no document with text (0 documents read); check the input, "
        "or pass --allow-empty to write an empty dataset")
    assert os.listdir(tmp_path / "out") == []
    res = subprocess.run(cmd + ["--allow-empty"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    # the same files Megatron-LM writes for an empty input (a 0-byte .bin cannot be mmapped)
    ds = IndexedDataset(f"{prefix}_text_document", mmap=False)
    assert len(ds) == 0 and list(ds.document_indices) == [0]


def test_empty_after_skipping_malformed_lines(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n[1]\n")
    with pytest.raises(EmptyInputError, match=r"bad\.jsonl holds no document with text "
                       r"\(0 documents read, 2 malformed lines skipped\)"):
        tokenize_to_datasets([str(path)], {"text": str(tmp_path / "o")}, tiny_tokenizer,
                             skip_malformed=True)
    res = tokenize_to_datasets([str(path)], {"text": str(tmp_path / "o")}, tiny_tokenizer,
                               skip_malformed=True, allow_empty=True)
    assert res.num_documents == {"text": 0} and os.path.getsize(tmp_path / "o.bin") == 0


def test_sigkill_of_the_main_process_ends_its_workers_and_the_rerun_cleans_up(
        tmp_path, tiny_tokenizer, make_jsonl, make_texts):
    """preprocess_data.py --workers 2 SIGKILLed while its workers encode: the workers exit
    within seconds (they watch their parent), and the next run removes the killed run's
    temporary files and writes the dataset."""
    src = make_jsonl(tmp_path / "big.jsonl", make_texts(20000, seed=6))
    prefix = tmp_path / "out" / "big"
    argv = [sys.executable, "tools/preprocess_data.py", "--input", src, "--output-prefix",
            str(prefix), "--tokenizer-model", tiny_tokenizer, "--workers", "2", "--append-eod"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        kids, deadline = [], time.time() + 60
        while len(kids) < 2 and proc.poll() is None and time.time() < deadline:
            kids = _children(proc.pid)
            time.sleep(0.005)
        assert len(kids) >= 2, "the run never started its workers"
        while not any(".tmp" in n for n in (os.listdir(prefix.parent)
                                            if prefix.parent.exists() else [])):
            assert time.time() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{k}") and _state(k) != "Z" for k in kids):
        assert time.time() < deadline, f"workers {kids} outlived their killed parent"
        time.sleep(0.1)
    left = [n for n in os.listdir(prefix.parent) if ".tmp" in n]
    assert left, "the killed run left no temporary files to clean (the test killed too late)"
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(prefix.parent)) == ["big_text_document.bin",
                                                 "big_text_document.idx",
                                                 "big_text_document.tokenizer.json"]


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat ('Z': a zombie, exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
