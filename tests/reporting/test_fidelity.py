"""The steering-fidelity table (reporting/fidelity.py) against a hand computation from two small
eval JSONs and an interval record written here: test ratio, its interval, test/valid - 1, z and
the verdict of a domain that agrees, one that differs beyond noise and one within noise;
Spearman against hand-worked examples with ties; the reasons given when inputs are missing; the
report section, report.json and the ratio plot's error bars."""

from __future__ import annotations

import json
import math
import os

import pytest

from megatron_ddk.cli import run_tool

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
from megatron_ddk.reporting import load_eval, load_run  # noqa: E402
from megatron_ddk.reporting.fidelity import average_ranks, fidelity_check, spearman  # noqa: E402
from megatron_ddk.reporting.plots import plot_interval_ppl, ratio_error_bars  # noqa: E402

SEQ = 100
DOMAINS = ["a", "b", "c"]
# per-sample mean CE on the test split: d = student - teacher
STUDENT = {"a": [3.0, 3.2, 2.8, 3.0], "b": [3.2, 3.3, 3.4, 3.5], "c": [2.0, 4.0, 2.5, 3.5]}
TEACHER = {"a": [2.0, 2.1, 1.9, 2.1], "b": [2.0, 2.1, 2.1, 2.2], "c": [2.0, 2.0, 2.0, 2.0]}
VALID_RATIO = [2.6, 2.8, 2.3]
VALID_SE = [0.05, 0.02, 0.3]
T975_3 = 3.182  # t(0.975, 3), table


def write_eval(path, per_sample, fmt=3, split="test", drop_samples=False):
    doms = {}
    for d in DOMAINS:
        vals = per_sample[d]
        loss = sum(vals) / len(vals)
        doms[d] = {"loss": loss, "ppl": math.exp(loss), "tokens": SEQ * len(vals),
                   "samples": len(vals), "fingerprint": f"sha256:{d * 8}"}
        if not drop_samples:
            doms[d].update(sample_losses=vals, sample_tokens=[SEQ] * len(vals))
    path.write_text(json.dumps({"format": fmt, "checkpoint": "x", "iteration": 0, "split": split,
                                "seq_length": SEQ, "fingerprint": "sha256:all",
                                "domains": doms}))
    return str(path)


def interval0(signal="validation", with_se=True):
    ci = [[r * math.exp(-T975_3 * s), r * math.exp(T975_3 * s)]
          for r, s in zip(VALID_RATIO, VALID_SE)]
    return {"kind": "interval", "interval": 0, "step": 0, "policy": "ddk", "signal": signal,
            "weights": [0.5, 0.3, 0.2], "r": [0.3, 0.4, 0.3], "domains": DOMAINS,
            "ratio": VALID_RATIO if signal == "validation" else None,
            "ratio_log_se": VALID_SE if with_se else None, "ratio_ci95": ci if with_se else None,
            "ppl_student": [10 * r for r in VALID_RATIO], "ppl_teacher": [10.0] * 3}


def write_run(folder, rec, config="ddk:\n  policy: ddk\n  interval: 4\n"):
    folder.mkdir(parents=True, exist_ok=True)
    rec1 = dict(rec, interval=1, step=4)
    (folder / "metrics.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec1) + "\n")
    (folder / "run_config.yaml").write_text(config)
    return str(folder)


def by_hand(d, valid, se_v):
    """mean, sd (ddof = 1), se, the test ratio and its interval, rel diff and z."""
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
    test = math.exp(mean)
    z = (mean - math.log(valid)) / math.sqrt(se_v ** 2 + se ** 2)
    return {"test": test, "lo": math.exp(mean - T975_3 * se), "hi": math.exp(mean + T975_3 * se),
            "rel": test / valid - 1, "z": z, "se": se}


@pytest.fixture
def evals(tmp_path):
    return (load_eval(write_eval(tmp_path / "s.json", STUDENT), "student_before"),
            load_eval(write_eval(tmp_path / "t.json", TEACHER), "teacher"))


def test_table_against_a_hand_computation(evals):
    fid = fidelity_check([interval0()], "DDK", *evals)
    assert fid["available"]
    status = {}
    for i, d in enumerate(DOMAINS):
        want = by_hand([s - t for s, t in zip(STUDENT[d], TEACHER[d])], VALID_RATIO[i],
                       VALID_SE[i])
        got = fid["per_domain"][d]
        assert got["valid_ratio"] == VALID_RATIO[i]
        assert got["test_ratio"] == pytest.approx(want["test"], rel=1e-12)
        assert got["test_log_se"] == pytest.approx(want["se"], rel=1e-12)
        assert got["test_ci95"] == pytest.approx([want["lo"], want["hi"]], rel=1e-12)
        assert got["rel_diff"] == pytest.approx(want["rel"], rel=1e-12)
        assert got["z"] == pytest.approx(want["z"], rel=1e-12)
        status[d] = got["status"]
    # a: +2.0% agrees; b: +24.6%, z = 6.3 beyond noise; c: +18.2% but z = 0.31, within noise
    assert status == {"a": "agree", "b": "differ beyond noise", "c": "differ within noise"}
    assert fid["flagged"] == ["b", "c"]
    b = fid["per_domain"]["b"]["verdict"]
    assert b.startswith("b: valid says 2.8, test says 3.49 (+25%), beyond their 95% intervals")
    assert "--valid-samples" in b and "--min-heldout-documents" in b
    assert "too small to resolve" in fid["per_domain"]["c"]["verdict"]
    assert fid["verdict"].startswith("2 of 3 domains differ by more than 10% (1 beyond")
    # ranks: valid (2, 3, 1), test (1, 3, 2): rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert fid["spearman"] == pytest.approx(0.5)


def test_agreement_verdict_and_unknown_noise(tmp_path, evals):
    student = {d: [t + math.log(VALID_RATIO[i]) + e for t, e in zip(TEACHER[d],
                                                                    (0.01, -0.01, 0.02, -0.02))]
               for i, d in enumerate(DOMAINS)}
    close = load_eval(write_eval(tmp_path / "close.json", student), "student_before")
    fid = fidelity_check([interval0()], "DDK", close, evals[1])
    assert fid["flagged"] == [] and fid["verdict"] == ("valid and test agree within 10% on every "
                                                       "domain (3 domains)")
    nose = fidelity_check([interval0(with_se=False)], "DDK", *evals,
                          run_config={"distill": {"teacher_logits": "/stores/teacher"}})
    assert all(p["z"] is None for p in nose["per_domain"].values())
    assert nose["per_domain"]["b"]["status"] == "differ, noise unknown"
    assert "offline store" in nose["per_domain"]["b"]["verdict"]


def test_spearman_with_ties_by_hand():
    assert average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # ranks x (1, 2.5, 2.5, 4), y (1, 3, 2, 4): sxy = 4.5, sxx = 4.5, syy = 5 -> sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), rel=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [2]) is None


def test_reasons_when_inputs_are_missing(tmp_path, evals):
    old = [load_eval(write_eval(tmp_path / f"{n}.json", p, fmt=2, drop_samples=True), n)
           for n, p in (("student_before", STUDENT), ("teacher", TEACHER))]
    valid = load_eval(write_eval(tmp_path / "v.json", STUDENT, split="valid"), "student_before")
    cases = [
        (fidelity_check([interval0()], "DDK", *old), "format 2"),
        (fidelity_check([interval0("training")], "DDK", *evals), "signal training"),
        (fidelity_check([interval0()], "DDK", evals[0], None), "no --eval named teacher"),
        (fidelity_check([interval0()], "DDK", valid, evals[1]), "on the valid split"),
        (fidelity_check([], "DDK", *evals), "recorded no interval 0"),
    ]
    for fid, reason in cases:
        assert not fid["available"] and reason in fid["reason"], fid


def test_eval_format_checks(tmp_path):
    with pytest.raises(ValueError, match="format 4 is not one of"):
        load_eval(write_eval(tmp_path / "f4.json", STUDENT, fmt=4), "x")
    bad = json.loads(open(write_eval(tmp_path / "b.json", STUDENT)).read())
    bad["domains"]["a"]["sample_losses"] = [1.0]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"domains.a.sample_losses: expected a list of 4"):
        load_eval(str(tmp_path / "b.json"), "x")
    two = load_eval(write_eval(tmp_path / "f2.json", STUDENT, fmt=2, drop_samples=True), "x")
    assert two.sample_losses == {} and two.samples["a"] == 4


def test_report_holds_the_table_and_the_plot_its_error_bars(tmp_path):
    ddk = write_run(tmp_path / "ddk", interval0())
    out = tmp_path / "out" / "report.md"
    argv = ["--out", str(out), "--eval", f"teacher={write_eval(tmp_path / 't.json', TEACHER)}",
            "--eval", f"student_before={write_eval(tmp_path / 's.json', STUDENT)}",
            "--run", f"DDK={ddk}"]
    assert run_tool("report", argv) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["fidelity"]["available"] and rep["fidelity"]["flagged"] == ["b", "c"]
    text = out.read_text()
    assert "## Steering fidelity" in text and "**Verdict:** 2 of 3 domains" in text
    assert "| b | 2.800 [2.627, 2.984] | 3.490 [" in text
    run = load_run(ddk, "DDK")
    where, below, above = ratio_error_bars(run.intervals, 1)
    assert where == [0, 1] and below[0] == pytest.approx(2.8 - 2.8 * math.exp(-T975_3 * 0.02))
    assert above[0] == pytest.approx(2.8 * math.exp(T975_3 * 0.02) - 2.8)
    assert plot_interval_ppl(run, str(tmp_path / "p.png"))
    nodir = tmp_path / "no" / "report.md"
    assert run_tool("report", ["--out", str(nodir)] + argv[2:6]) == 0
    assert "Not available: no --run named 'DDK'." in nodir.read_text()
