"""DDK exactly as Algorithm 1, on real tiny runs (docs/ddk.md, "Algorithm 1").

One process trains two runs of the same tiny pair, 9 steps with K = 3: DDK with the validation
signal and DDK with the training signal, counting every forward call of the teacher and the
student. From each DDK run's metrics.jsonl alone, r_0 (Eq. 1) and every
interval's r (Eq. 2 with alpha and the previous r) are re-derived by the formulas written out
below in plain float math, to 1e-9. The training signal's teacher CE is checked against a dense
float64 recomputation over interval 0's batches, its student CE against the logged step losses,
and it must cost no forward pass over KD (one teacher and one student forward per training
micro-batch, as KD does; ddk_eval = 0); stopped inside an interval and resumed, it records the
same intervals. A TP = 2 run of the
training signal reports the same per-domain teacher CE as TP = 1.
"""

import json
import math
import os

import pytest
import yaml

from megatron_ddk.testing import tiny_run
from megatron_ddk.testing.multiproc import run_distributed

STEPS, K, MBS, GBS, SEQ = 9, 3, 2, 8, 32
RUNS = {"validation": {"policy": "ddk", "signal": "validation"},
        "training": {"policy": "ddk", "signal": "training"}}


def _config(tiny, run_dir, ddk, steps=STEPS, parallel=None, checkpoint=None, train=None):
    extra = {"ddk": {k: v for k, v in ddk.items() if k != "policy"},
             "checkpoint": checkpoint or {"save": None}, "train": train or {}}
    if parallel:
        extra["parallel"] = parallel
    cfg = tiny_run.run_config(tiny["manifest"], run_dir, teacher_load=tiny["teacher"],
                              policy=ddk["policy"], train_iters=steps, interval=K,
                              seq_length=SEQ, extra=extra)
    assert (cfg["train"]["micro_batch_size"], cfg["train"]["global_batch_size"]) == (MBS, GBS)
    return tiny_run.write_config(cfg, os.path.join(run_dir, "run.yaml"))


def _dense_teacher_ce(trainer, weights0):
    """Per-domain teacher CE (sum, tokens) over interval 0's batches, float64, full vocab."""
    import torch

    from megatron_ddk.data.mixture import IntervalMixture, collate

    data = trainer.data
    mix = IntervalMixture(data.datasets.num_train_samples, GBS, K, trainer.cfg.train.seed,
                          trainer.names)
    mix.start_interval(weights0, num_steps=K)
    n = len(trainer.names)
    sums, tokens = [0.0] * n, [0.0] * n
    with torch.no_grad():
        for _ in range(K):
            batch = collate(mix.next_global_batch(), data.datasets.train)
            logits = trainer.source.model(batch["tokens"], batch["position_ids"], None)
            logp = torch.log_softmax(logits[..., :data.vocab_size].double(), -1)
            ce = -logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
            mask = batch["loss_mask"].double()
            for b, d in enumerate(batch["domain_id"].tolist()):
                sums[d] += float((ce[b] * mask[b]).sum())
                tokens[d] += float(mask[b].sum())
    return sums, tokens


def _three_runs(rank, world, tiny, root):
    from megatron_ddk.config import load_config, static_checks
    from megatron_ddk.parallel import destroy, initialize
    from megatron_ddk.parallel.state import seed_everything
    from megatron_ddk.training.trainer import Trainer

    ctx = initialize(1, 1, seed=1234)
    out = {}
    try:
        for name, ddk in RUNS.items():
            run_dir = os.path.join(root, name)
            cfg = static_checks(load_config(_config(tiny, run_dir, ddk)), 1)
            seed_everything(cfg.train.seed, 0, 0)  # as a fresh process would start
            trainer = Trainer(cfg, ctx)
            calls = {"teacher": 0, "student": 0}
            for key, module in (("teacher", trainer.source.model), ("student", trainer.student)):
                module.register_forward_hook(
                    lambda *_, key=key, calls=calls: calls.__setitem__(key, calls[key] + 1))
            assert trainer.run() == 0
            out[name] = dict(calls, run_dir=run_dir)
            if name == "training":
                out["dense_teacher"] = _dense_teacher_ce(trainer,
                                                         trainer.controller.history[0]["weights"])
        # the training signal stopped mid-interval (step 4 of [3, 6)) and resumed
        run_dir = os.path.join(root, "training_resumed")
        ckpt = os.path.join(run_dir, "ckpt")
        for part in ({"checkpoint": {"save": ckpt}, "train": {"exit_interval": K + 1}},
                     {"checkpoint": {"save": ckpt, "load": ckpt}}):
            cfg = static_checks(load_config(_config(tiny, run_dir, RUNS["training"], **part)), 1)
            seed_everything(cfg.train.seed, 0, 0)
            assert Trainer(cfg, ctx).run() == 0
        out["training_resumed"] = {"run_dir": run_dir}
    finally:
        destroy()
    return out


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("algo"))
    return run_distributed(_three_runs, 1, tiny, root, timeout=600)[0]


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _natural(manifest):
    with open(manifest) as f:
        tokens = [d["num_train_tokens"] for d in yaml.safe_load(f)["domains"]]
    return [t / sum(tokens) for t in tokens]


# ---- the paper's formulas, written out independently of megatron_ddk.ddk -------------------
def eq1(ratio):
    """r[i] = exp(ratio[i]) / sum_j exp(ratio[j])."""
    e = [math.exp(x) for x in ratio]
    return [x / sum(e) for x in e]


def eq2(r, ratio, alpha):
    """psi = r * exp(ratio); r_next = alpha * psi / sum(psi) + (1 - alpha) / N."""
    psi = [ri * math.exp(x) for ri, x in zip(r, ratio)]
    return [alpha * p / sum(psi) + (1 - alpha) / len(r) for p in psi]


def ppl_ratio(loss_student, loss_teacher):
    return [math.exp(s) / math.exp(t) for s, t in zip(loss_student, loss_teacher)]


def _close(got, want, tol=1e-9):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert abs(g - w) <= tol * max(1.0, abs(w)), (got, want)


def test_validation_signal_rederived_from_metrics(runs, tiny):
    recs = _records(runs["validation"]["run_dir"], "interval")
    assert [r["step"] for r in recs] == [0, K, 2 * K]
    first = recs[0]
    assert (first["signal"], first["initial_sampling"], first["r0_source"]) == \
        ("validation", "natural", "eq1")
    ratio0 = ppl_ratio(first["loss_student"], first["loss_teacher"])
    _close(first["ratio"], ratio0)
    r = eq1(ratio0)                              # r_0: Eq. 1 before the first step
    _close(first["r0"], r)
    _close(first["r"], r)
    _close(first["weights"], _natural(tiny["manifest"]))  # D_0: the natural mixture
    for rec in recs[1:]:
        assert rec["loss_teacher"] == first["loss_teacher"]  # teacher measured once
        ratio = ppl_ratio(rec["loss_student"], rec["loss_teacher"])
        _close(rec["ratio"], ratio)
        r = eq2(r, ratio, rec["alpha"])          # psi_1 = r_0 * exp(ratio_1), then the history
        _close(rec["r"], r)
        _close(rec["weights"], r)                # no floor / cap configured
    assert recs[1]["weights"] != recs[0]["weights"]
    for rec in recs:  # 8 validation samples a domain: the 95% interval uses t(0.975, 7)
        for ratio, se, (lo, hi) in zip(rec["ratio"], rec["ratio_log_se"], rec["ratio_ci95"]):
            assert 0 < se < 1 and lo < ratio < hi
            _close([lo, hi], [ratio * math.exp(-2.365 * se), ratio * math.exp(2.365 * se)],
                   tol=1e-6)


def _carry(rec, previous):
    """The ratio the training signal uses: measured, else the previous one, else the mean."""
    measured = [math.exp(s) / math.exp(t) if s is not None else None
                for s, t in zip(rec["loss_student"], rec["loss_teacher"])]
    known = [x for x in measured if x is not None]
    out = []
    for i, x in enumerate(measured):
        if x is None:
            x = previous[i] if previous is not None else sum(known) / len(known)
        out.append(x)
    return out


def test_training_signal_rederived_from_metrics(runs, tiny):
    recs = _records(runs["training"]["run_dir"], "interval")
    steps = _records(runs["training"]["run_dir"], "step")
    first = recs[0]
    assert (first["signal"], first["r0_source"], first["ratio"]) == ("training", "uniform", None)
    # ratios from training batches have no paired per-sample losses: no standard error
    assert all(r["ratio_log_se"] is None and r["ratio_ci95"] is None for r in recs)
    n = len(first["weights"])
    r = [1.0 / n] * n                            # nothing measured before step 1
    _close(first["r0"], r)
    _close(first["weights"], _natural(tiny["manifest"]))
    previous = None
    for t, rec in enumerate(recs[1:], start=1):
        # the means are over exactly interval t-1's training tokens
        assert sum(rec["signal_tokens"]) == K * GBS * SEQ
        assert rec["train_lm_loss"] == rec["loss_student"]
        interval_steps = [s["lm_loss"] for s in steps if K * (t - 1) < s["step"] <= K * t]
        pooled = sum(ls * n for ls, n in zip(rec["loss_student"], rec["signal_tokens"]) if n)
        assert pooled / sum(rec["signal_tokens"]) == pytest.approx(
            sum(interval_steps) / K, rel=1e-5)
        ratio = _carry(rec, previous)
        _close(rec["ratio"], ratio)
        r = eq2(r, ratio, rec["alpha"])
        _close(rec["r"], r)
        _close(rec["weights"], r)
        previous = ratio
    # the teacher's CE on interval 0's batches, recomputed densely in float64
    sums, tokens = runs["dense_teacher"]
    assert recs[1]["signal_tokens"] == tokens
    for got, s, n in zip(recs[1]["loss_teacher"], sums, tokens):
        assert (got is None) if n == 0 else got == pytest.approx(s / n, rel=1e-5)


def test_training_signal_costs_no_forward_pass_over_kd(runs):
    val, train = runs["validation"], runs["training"]
    per_run = STEPS * GBS // MBS  # KD: one teacher and one student forward per micro-batch
    assert train["teacher"] == train["student"] == per_run
    assert val["teacher"] > per_run and val["student"] > val["teacher"]  # evaluation passes
    timing = {name: _records(runs[name]["run_dir"], "end")[0]["timing"] for name in RUNS}
    assert timing["training"]["ddk_eval"] == 0.0 < timing["validation"]["ddk_eval"]


def test_training_signal_teacher_ce_same_at_tp2(runs, tiny, tmp_path):
    run_dir = str(tmp_path / "training_tp2")
    path = _config(tiny, run_dir, RUNS["training"], steps=K + 1,
                   parallel={"tensor_model_parallel_size": 2})
    tiny_run.train(path, nproc=2)
    tp2 = _records(run_dir, "interval")[1]
    tp1 = _records(runs["training"]["run_dir"], "interval")[1]
    assert tp2["signal_tokens"] == tp1["signal_tokens"]
    for a, b in zip(tp2["loss_teacher"], tp1["loss_teacher"]):
        assert (a is None and b is None) or abs(a - b) < 1e-5


def test_training_signal_resumes_exactly_mid_interval(runs):
    """The interval's CE sums (student and teacher) are in the checkpoint: a run stopped inside an
    interval and resumed records the same ratios, r and weights as the uninterrupted one."""
    keys = ("interval", "step", "ratio", "ratio_source", "r", "weights", "loss_student",
            "loss_teacher", "signal_tokens", "train_lm_loss")
    whole = _records(runs["training"]["run_dir"], "interval")
    resumed = _records(runs["training_resumed"]["run_dir"], "interval")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in whole]
