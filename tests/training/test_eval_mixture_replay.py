"""tools/simulate_mixture.py --weights on a real DDK run's metrics.jsonl: replaying its interval
records (not the step records, which carry weights too) reproduces the samples the run consumed
per domain, as the run itself recorded them."""

from __future__ import annotations

import json
import os

from megatron_ddk.testing import tiny_run

K, STEPS, GBS, SEQ = 4, 12, 8, 32


def _simulator():
    from megatron_ddk.commands import simulate_mixture

    return simulate_mixture


def _totals(text):
    block = text.split("totals:")[1].strip().split("\n\n")[0]
    return {ln.split()[0]: int(ln.split()[1]) for ln in block.splitlines()[1:]}


def test_replay_of_a_real_run_reproduces_its_consumption(tiny, tmp_path, capsys):
    run_dir = str(tmp_path / "ddk")
    cfg = tiny_run.run_config(tiny["manifest"], run_dir, teacher_load=tiny["teacher"],
                              policy="ddk", train_iters=STEPS, interval=K, seq_length=SEQ,
                              extra={"checkpoint": {"save": None}})
    assert (cfg["train"]["global_batch_size"], cfg["train"]["seed"]) == (GBS, 1234)
    tiny_run.train(tiny_run.write_config(cfg, os.path.join(run_dir, "run.yaml")))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    intervals = [r for r in records if r["kind"] == "interval"]
    assert [r["interval"] for r in intervals] == [0, 1, 2]
    assert intervals[1]["weights"] != intervals[0]["weights"]  # DDK moved them
    assert sum(r["kind"] == "step" and "weights" in r for r in records) >= STEPS
    # the run recorded, at interval 2's start, what intervals 0 and 1 consumed
    consumed = dict(zip(intervals[2]["domains"], intervals[2]["samples_consumed"]))
    _simulator().main(["--manifest", tiny["manifest"], "--weights", metrics, "--steps",
                       str(2 * K), "--interval", str(K), "--global-batch-size", str(GBS),
                       "--seq-length", str(SEQ), "--seed", "1234"])
    assert _totals(capsys.readouterr().out) == consumed
    assert sum(consumed.values()) == 2 * K * GBS
