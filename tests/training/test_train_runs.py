"""Real training runs (torchrun, gloo) on the tiny set-up: KD at TP=2, DDK at DP=2, eval at
TP=1 vs TP=2, and the logging contract (metrics.jsonl, TensorBoard, metadata)."""

import glob
import json
import math
import os

import pytest

from megatron_ddk.testing import tiny_run

STEP_FIELDS = ("step", "loss", "lm_loss", "kd_loss", "lr", "grad_norm", "consumed_samples")


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run(tiny, tmp_path, name, nproc, **kw):
    run_dir = str(tmp_path / name)
    cfg = tiny_run.run_config(tiny["manifest"], run_dir, **kw)
    path = tiny_run.write_config(cfg, os.path.join(run_dir, "run.yaml"))
    out = tiny_run.train(path, nproc=nproc)
    return run_dir, path, out


@pytest.fixture(scope="module")
def ddk_dp2(tiny, tmp_path_factory):
    return _run(tiny, tmp_path_factory.mktemp("ddk"), "ddk_dp2", 2, teacher_load=tiny["teacher"],
                policy="ddk", train_iters=12, interval=4)


def test_kd_at_tp2_trains_and_logs(tiny, tmp_path):
    run_dir, _, out = _run(tiny, tmp_path, "kd_tp2", 2, teacher_load=tiny["teacher"],
                           policy="static", train_iters=10,
                           extra={"parallel": {"tensor_model_parallel_size": 2}})
    steps = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 11))
    for r in steps:
        assert all(r[k] is not None for k in STEP_FIELDS), r
        assert r["kd_loss"] > 0
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"] - 0.05, "loss must fall"
    assert "tok/s" in out and "eta" in out
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    meta = json.load(open(os.path.join(run_dir, "metadata.json")))
    assert meta["tp"] == 2 and meta["tokenizer_hash"].startswith("sha256:")
    assert "torch" in meta["versions"] and os.path.isfile(os.path.join(run_dir, "run_config.yaml"))
    timing = steps[-1]["timing"]
    assert timing["teacher_forward"] > 0 and timing["student_forward_backward"] > 0


def test_ddk_at_dp2_reweights_at_interval_boundaries(ddk_dp2):
    run_dir, _, _ = ddk_dp2
    recs = read_metrics(run_dir)
    intervals = [r for r in recs if r["kind"] == "interval"]
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in intervals] == [0, 4, 8]
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"] - 0.05
    w = [r["weights"] for r in intervals]
    assert w[0] != w[1] != w[2], "DDK must move the weights at each boundary"
    for r in steps:  # weights change only at boundaries
        assert r["weights"] == intervals[(r["step"] - 1) // 4]["weights"]
    first = intervals[0]
    assert first["ppl_teacher"] and first["ratio"] and abs(sum(w[1]) - 1) < 1e-12
    # r_0 = Eq. 1 and then Eq. 2 (alpha 0.5) from the logged ppls; interval 0 samples the
    # natural mixture (Algorithm 1; tests/training/test_ddk_algorithm.py re-derives it all)
    ratios = [[s / t for s, t in zip(r["ppl_student"], r["ppl_teacher"])] for r in intervals]
    e = [math.exp(x) for x in ratios[0]]
    r = [x / sum(e) for x in e]
    assert first["r0"] == pytest.approx(r, rel=1e-9) and first["initial_sampling"] == "natural"
    for t in (1, 2):
        psi = [p * math.exp(x) for p, x in zip(r, ratios[t])]
        r = [0.5 * x / sum(psi) + 0.5 / len(psi) for x in psi]
        assert w[t] == pytest.approx(r, rel=1e-9)
    # consumption per domain adds up to the samples trained on
    assert sum(intervals[2]["samples_consumed"]) == 8 * 8
    # the per-sample validation losses gathered over both DP ranks give every ratio its SE
    for rec in intervals:
        assert len(rec["ratio_log_se"]) == len(rec["ratio"]) == 5
        for ratio, se, (lo, hi) in zip(rec["ratio"], rec["ratio_log_se"], rec["ratio_ci95"]):
            assert 0 < se < 1 and lo < ratio < hi


def test_eval_same_at_tp1_and_tp2(ddk_dp2, tmp_path):
    run_dir, cfg_path, _ = ddk_dp2
    results = []
    for tp in (1, 2):
        out = str(tmp_path / f"eval_tp{tp}.json")
        args = ["-m", "megatron_ddk.cli", "eval", "--config", cfg_path, "--load",
                os.path.join(run_dir, "ckpt"), "--output", out,
                f"parallel.tensor_model_parallel_size={tp}"]
        if tp == 2:
            args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] + args
        printed = tiny_run.run_tool(args)
        assert "ppl" in printed
        results.append(json.load(open(out)))
    a, b = (r["domains"] for r in results)
    assert a.keys() == b.keys() and len(a) == 5  # the tiny demo corpus: 5 domains
    for name in a:
        assert abs(a[name]["loss"] - b[name]["loss"]) < 1e-5
        assert a[name]["tokens"] == b[name]["tokens"] > 0
