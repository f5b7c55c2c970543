"""Weights & Biases logging (logging.wandb_project) in wandb's offline mode: a DDK run at DP=2
writes one wandb run (rank 0 only) whose history holds the step losses and the interval weights,
ratios and r of metrics.jsonl. The run file (run-*.wandb) is read back with wandb's own record
format (wandb.proto) through a reader of its block log, written here from the format."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest

from megatron_ddk.testing import tiny_run

pytest.importorskip("wandb")

BLOCK, HEADER = 32768, 7
"""wandb's run file: a 7-byte file header (":W&B", magic 0xBEE1, version), then records in
32 KiB blocks, each chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
4 last)."""


def read_history(path: str) -> dict:
    """{step: {key: value}} of every history record in a run-*.wandb file."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    ident, magic, _version = struct.unpack("<4sHB", raw[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, chunk, records = HEADER, b"", []
    while pos + HEADER <= len(raw):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        if kind == 0:
            break
        chunk += raw[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            records.append(chunk)
            chunk = b""
    history: dict = {}
    for data in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                   for i in rec.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return history


def test_offline_wandb_run_holds_step_losses_and_interval_weights(tiny, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "ddk")
    cfg = tiny_run.run_config(tiny["manifest"], run_dir, teacher_load=tiny["teacher"],
                              policy="ddk", train_iters=8, interval=4, extra={"logging": {
                                  "wandb_project": "ddk-test", "wandb_exp_name": "tiny-ddk"}})
    path = tiny_run.write_config(cfg, os.path.join(run_dir, "run.yaml"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_run.train(path, nproc=2)

    files = glob.glob(os.path.join(run_dir, "wandb", "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files  # rank 0 only
    history = read_history(files[0])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if r["kind"] == "step"]
    intervals = [r for r in records if r["kind"] == "interval"]
    assert [r["step"] for r in steps] == list(range(1, 9)) and len(intervals) >= 2
    for r in steps:  # the same float, written by json in both files
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert history[r["step"]]["train/lr"] == pytest.approx(r["lr"], rel=1e-12)
    for r in intervals:
        row = history[r["step"]]
        for name, w, ratio, rr in zip(r["domains"], r["weights"], r["ratio"], r["r"]):
            assert row[f"ddk/weights/{name}"] == pytest.approx(w, rel=1e-12)
            assert row[f"ddk/ratio/{name}"] == pytest.approx(ratio, rel=1e-12)
            assert row[f"ddk/r/{name}"] == pytest.approx(rr, rel=1e-12)
