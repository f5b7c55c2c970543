"""tools/make_report.py and tools/plot_run.py on hand-built run folders and eval results whose
numbers are known: the perplexity table and its means, the improvement flags, DDK vs KD, the
weight-direction facts (also on records from the real DDKController, checked against Eq. 2
written out here), valid PNGs, and clear errors for missing files and malformed lines."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from megatron_ddk.cli import run_tool

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
from megatron_ddk.commands import (
    plot_run,  # noqa: E402
)
from megatron_ddk.config.schema import DDKConfig  # noqa: E402
from megatron_ddk.ddk import DDKController  # noqa: E402
from megatron_ddk.reporting import load_run, weight_direction  # noqa: E402

DOMAINS = ["a", "b", "c"]
TOKENS = [100, 300, 600]
PPL = {  # the report's columns, in order
    "teacher": [10.0, 20.0, 30.0],
    "student_before": [20.0, 40.0, 50.0],
    "KD": [18.0, 41.0, 45.0],
    "DDK": [19.0, 39.0, 49.0],
}


SEQ = 100


def write_eval(path, ppls, tokens=TOKENS, domains=DOMAINS, changes=None):
    """An eval result as `megatron-ddk eval` writes it (tokens = samples x seq_length); changes
    edit top-level fields, or a domain's with keys 'domain.field' (None deletes)."""
    doms = {d: {"loss": math.log(p), "ppl": p, "tokens": t, "samples": t // SEQ,
                "fingerprint": f"sha256:{d * 8}"} for d, p, t in zip(domains, ppls, tokens)}
    data = {"format": 2, "checkpoint": "x", "iteration": 1, "split": "test",
            "seq_length": SEQ, "fingerprint": "sha256:all", "domains": doms}
    for key, value in (changes or {}).items():
        where, name = (doms[key.split(".")[0]], key.split(".")[1]) if "." in key else (data, key)
        if value is None:
            where.pop(name)
        else:
            where[name] = value
    path.write_text(json.dumps(data))
    return str(path)


def interval(i, step, weights, ratio=None):
    rec = {"kind": "interval", "interval": i, "step": step, "weights": weights, "r": weights,
           "ratio": ratio, "domains": DOMAINS, "wraps": [0, 0, 0]}
    if ratio is not None:
        rec["ppl_teacher"] = [10.0, 10.0, 10.0]
        rec["ppl_student"] = [10.0 * x for x in ratio]
    else:
        rec["ppl_teacher"] = rec["ppl_student"] = None
    return rec


def step(s, weights, kd=0.5):
    return {"kind": "step", "step": s, "loss": 5.0 - 0.1 * s, "lm_loss": 4.9 - 0.1 * s,
            "kd_loss": kd, "lr": 1e-3, "grad_norm": 1.0, "consumed_samples": 8 * s,
            "tokens_per_sec": 100.0, "mfu": None, "weights": weights, "interval": 0,
            "timing": {"optimizer": 0.1 * s}}


def write_run(folder, intervals, policy="ddk", num_steps=8, kd=0.5, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    recs = [intervals[0]] + [step(s, intervals[0]["weights"], kd) for s in range(1, 5)]
    recs += intervals[1:] + [step(s, intervals[-1]["weights"], kd) for s in range(5, num_steps + 1)]
    recs.append({"kind": "end", "step": num_steps, "reason": "budget",
                 "timing": {"optimizer": 0.8, "ddk_eval": 0.3}, "elapsed_s": 12.5})
    text = "".join(json.dumps(r) + "\n" for r in recs) + tail
    (folder / "metrics.jsonl").write_text(text)
    (folder / "run_config.yaml").write_text(f"ddk:\n  policy: {policy}\n  interval: 4\n")
    return str(folder)


def assert_png(path, min_bytes=5000):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", head[16:24])  # the IHDR chunk
    assert width >= 300 and height >= 200, (path, width, height)
    assert os.path.getsize(path) >= min_bytes, (path, os.path.getsize(path))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    evals = [f"{n}={write_eval(tmp / f'{n}.json', p)}" for n, p in PPL.items()]
    ddk = write_run(tmp / "ddk", [interval(0, 0, [0.5, 0.3, 0.2], [1.1, 1.3, 1.2]),
                                  interval(1, 4, [0.4, 0.4, 0.2], [1.2, 2.0, 1.5])])
    kd = write_run(tmp / "kd", [interval(0, 0, [0.5, 0.3, 0.2]), interval(1, 4, [0.5, 0.3, 0.2])],
                   policy="static")
    (tmp / "timing.json").write_text(json.dumps({"setup": 30.0, "teacher": 90.0, "ddk": 60.0,
                                                 "total (before report)": 200.0}))
    out = tmp / "out" / "report.md"
    argv = ["--out", str(out), "--title", "T"] + sum((["--eval", e] for e in evals), [])
    argv += ["--run", f"KD={kd}", "--run", f"DDK={ddk}", "--timing", str(tmp / "timing.json")]
    assert run_tool("report", argv) == 0
    return out, json.loads((tmp / "out" / "report.json").read_text())


def test_table_and_means(report):
    _, rep = report
    t = rep["table"]
    assert t["columns"] == list(PPL) and t["domains"] == DOMAINS
    for name, ppls in PPL.items():
        assert [t["ppl"][name][d] for d in DOMAINS] == pytest.approx(ppls)
    # Written out by hand: (100 * p_a + 300 * p_b + 600 * p_c) / 1000.
    assert t["mean_ppl"]["teacher"] == pytest.approx(25.0)
    assert t["mean_ppl"]["student_before"] == pytest.approx(44.0)
    assert t["mean_ppl"]["KD"] == pytest.approx(41.1)
    # Pooled: the token-weighted geometric mean of the perplexities.
    assert t["pooled_ppl"]["teacher"] == pytest.approx(10 ** 0.1 * 20 ** 0.3 * 30 ** 0.6)


def test_improvement_and_comparison(report):
    _, rep = report
    imp = rep["improvement"]
    assert set(imp) == {"teacher", "KD", "DDK"}
    assert imp["teacher"]["improved_all"] and imp["DDK"]["improved_all"]
    assert not imp["KD"]["improved_all"] and imp["KD"]["num_improved"] == 2
    assert imp["KD"]["improved"] == {"a": True, "b": False, "c": True}
    assert imp["DDK"]["rel_change"]["a"] == pytest.approx(-0.05)
    assert imp["KD"]["rel_change"]["b"] == pytest.approx(0.025)
    cmp_ = rep["ddk_vs_kd"]
    assert cmp_["first"] == "DDK" and cmp_["second"] == "KD"
    assert {d: p["lower"] for d, p in cmp_["per_domain"].items()} == {"a": "KD", "b": "DDK",
                                                                     "c": "KD"}
    assert cmp_["num_first_lower"] == 1
    assert cmp_["per_domain"]["c"]["rel_diff"] == pytest.approx(4 / 45)


def test_weight_direction_and_markdown(report):
    path, rep = report
    wd = rep["weight_direction"]
    assert wd["available"] and wd["max_ratio_domain"] == "b"
    assert wd["weight_before"] == 0.3 and wd["weight_after"] == 0.4 and wd["weight_rose"]
    assert wd["factor"] == pytest.approx([0.8, 4 / 3, 1.0]) and wd["largest_factor"]
    assert wd["psi_over_r"] == pytest.approx([math.exp(1.2), math.exp(2.0), math.exp(1.5)])
    assert rep["timing"]["total_s"] == 200.0 and len(rep["timing"]["stages"]) == 3
    assert rep["runs"]["KD"]["policy"] == "static" and rep["runs"]["DDK"]["last_step"] == 8
    md = path.read_text()
    assert "| a | 10.00 | 20.00 | 18.00 | 19.00 |" in md
    assert "| **mean (token-weighted)** | 25.00 | 44.00 | 41.10 |" in md
    assert "| KD | no (2/3) | -10.0% | +2.5% | -10.0% |" in md
    assert "**b**" in md and "rose" in md and "| teacher | 90.0 | 1m30.0s | 45.0% |" in md
    assert "| **total (before report)** | 200.0 | 3m20.0s | 100% |" in md
    for key in ("domain_ppl", "ddk_weights", "ddk_interval_ppl", "loss_overlay"):
        rel = rep["plots"][key]
        assert not os.path.isabs(rel) and f"]({rel})" in md
        assert_png(os.path.join(path.parent, rel))
    assert "KD_interval_ppl" not in rep["plots"]  # static: nothing evaluated


def test_weight_fell_is_reported(tmp_path):
    """The max-ratio domain's weight falls and its factor is not the largest: both reported."""
    run = load_run(write_run(tmp_path / "r", [
        interval(0, 0, [0.5, 0.3, 0.2], [1.0, 1.0, 1.0]),
        interval(1, 4, [0.55, 0.25, 0.2], [1.2, 2.0, 1.5])]))
    wd = weight_direction(run)
    assert wd["max_ratio_domain"] == "b" and not wd["weight_rose"]
    assert wd["delta"] == pytest.approx(-0.05) and not wd["largest_factor"]
    assert not weight_direction(load_run(write_run(tmp_path / "s", [
        interval(0, 0, [0.5, 0.3, 0.2]), interval(1, 4, [0.5, 0.3, 0.2])])))["available"]


@pytest.mark.parametrize("initial", ["uniform", "eq1"])
def test_weight_direction_on_controller_records(tmp_path, initial):
    """Interval records as the real DDKController writes them, against Eq. 2 written here."""
    cfg = DDKConfig(policy="ddk", initial_sampling=initial, alpha=0.5)
    ctl = DDKController(cfg, DOMAINS, [0.5, 0.3, 0.2])
    teacher = [2.0, 2.0, 2.0]
    ctl.next_weights(0, [3.0, 3.2, 3.1], teacher)
    ctl.next_weights(4, [2.5, 2.9, 2.6])
    recs = [dict(h, kind="interval", domains=DOMAINS) for h in ctl.history]
    wd = weight_direction(load_run(write_run(tmp_path / "c", recs)))
    r0 = [math.exp(math.exp(s - 2.0)) for s in (3.0, 3.2, 3.1)]  # Eq. 1: the prior, always
    r0 = [w / sum(r0) for w in r0]
    ratio = [math.exp(s - 2.0) for s in (2.5, 2.9, 2.6)]
    psi = [w * math.exp(r) for w, r in zip(r0, ratio)]
    w1 = [0.5 * p / sum(psi) + 0.5 / 3 for p in psi]
    assert wd["max_ratio_domain"] == "b"
    # the update is compared with the prior it multiplies (r_0), whatever D_0 was drawn with
    assert wd["weights_after"] == pytest.approx(w1) and wd["weights_before"] == pytest.approx(r0)
    assert wd["before"].startswith("r_0")
    assert wd["weight_rose"] == (w1[1] > r0[1]) and wd["weight_rose"]  # 0.474 > 0.440
    assert wd["largest_factor"]


def test_plot_run_static_and_overlay(tmp_path, capsys):
    static = write_run(tmp_path / "cpt", [interval(0, 0, [0.5, 0.3, 0.2]),
                                          interval(1, 4, [0.5, 0.3, 0.2])], policy="static",
                       kd=0.0)
    ddk = write_run(tmp_path / "ddk", [interval(0, 0, [0.5, 0.3, 0.2], [1.1, 1.3, 1.2]),
                                       interval(1, 4, [0.4, 0.4, 0.2], [1.2, 2.0, 1.5])])
    assert plot_run.main([static]) == 0
    out = capsys.readouterr().out
    assert "interval_ppl.png skipped" in out
    assert sorted(os.listdir(os.path.join(static, "plots"))) == ["loss.png", "weights.png"]
    assert plot_run.main([f"CPT={static}", ddk, "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out.split("\n")
    files = sorted(os.listdir(tmp_path / "p"))
    assert files == ["CPT_loss.png", "CPT_weights.png", "ddk_interval_ppl.png", "ddk_loss.png",
                     "ddk_weights.png", "loss_overlay.png"]
    for name in files:
        assert_png(str(tmp_path / "p" / name))
        assert str(tmp_path / "p" / name) in printed


def test_unfinished_last_line_is_skipped(tmp_path):
    run = load_run(write_run(tmp_path / "r", [interval(0, 0, [0.5, 0.3, 0.2])],
                             tail='{"kind": "step", "st'))
    assert run.end is not None and len(run.steps) == 8


def _cli(tool, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args],
                          capture_output=True, text=True, timeout=120)


def test_errors_name_file_and_line(tmp_path):
    run = write_run(tmp_path / "r", [interval(0, 0, [0.5, 0.3, 0.2])])
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().split("\n")
    lines[2] = lines[2][:25]  # a cut line in the middle of the file
    (tmp_path / "r" / "metrics.jsonl").write_text("\n".join(lines))
    res = _cli("plot_run.py", run)
    assert res.returncode == 2
    assert f"{os.path.join(run, 'metrics.jsonl')}:3: not a valid JSON line" in res.stderr
    good = write_eval(tmp_path / "t.json", PPL["teacher"])
    res = _cli("make_report.py", "--out", str(tmp_path / "o" / "r.md"), "--eval", f"T={good}",
               "--eval", f"S={tmp_path / 'missing.json'}")
    assert res.returncode == 2 and "missing.json" in res.stderr and "does not exist" in res.stderr
    assert not (tmp_path / "o" / "r.md").exists()


def test_eval_errors(tmp_path, capsys):
    good = write_eval(tmp_path / "t.json", PPL["teacher"])
    other = write_eval(tmp_path / "o.json", PPL["KD"], domains=["a", "b", "x"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"domains": {"a": {"loss": "high"}}}')
    out = str(tmp_path / "r.md")
    assert run_tool("report", ["--out", out, "--eval", f"T={good}", "--eval", f"O={other}"]) == 2
    assert "o.json has domains" in capsys.readouterr().err
    assert run_tool("report", ["--out", out, "--eval", f"B={bad}"]) == 2
    assert "bad.json: domains.a.loss: expected a finite number" in capsys.readouterr().err


def test_resumed_run_repeats_an_interval(tmp_path):
    """A run resumed at an interval boundary logs that interval twice; the last one counts."""
    folder = write_run(tmp_path / "r", [interval(0, 0, [0.5, 0.3, 0.2], [1.1, 1.3, 1.2]),
                                        interval(1, 4, [0.1, 0.1, 0.8], [1.2, 2.0, 1.5])])
    again = interval(1, 4, [0.4, 0.4, 0.2], [1.2, 2.0, 1.5])
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(again) + "\n")
    run = load_run(folder)
    assert [r["interval"] for r in run.intervals] == [0, 1]
    assert weight_direction(run)["weights_after"] == [0.4, 0.4, 0.2]


@pytest.mark.parametrize("changes, field, mine, theirs", [
    ({"split": "valid"}, "split", "'valid'", "'test'"),
    ({"seq_length": 256}, "seq_length", "256", "100"),
    ({"b.samples": 2}, "domains.b.samples", "2", "3"),
    ({"c.fingerprint": "sha256:other"}, "domains.c.fingerprint", "'sha256:other'",
     "'sha256:cccccccc'"),
])
def test_refuses_evaluations_on_other_samples(tmp_path, capsys, changes, field, mine, theirs):
    ref = write_eval(tmp_path / "teacher.json", PPL["teacher"])
    other = write_eval(tmp_path / "kd.json", PPL["KD"], changes=changes)
    out = tmp_path / "o" / "report.md"
    assert run_tool("report", ["--out", str(out), "--eval", f"teacher={ref}",
                             "--eval", f"KD={other}"]) == 2
    err = capsys.readouterr().err
    assert f"{other} (KD) was evaluated on other samples than {ref} (teacher): {field}" in err
    assert f"is {mine} there but {theirs} here" in err
    assert "same --split, --samples and data.seq_length" in err
    assert not out.exists()


@pytest.mark.parametrize("missing", ["split", "seq_length", "a.samples", "b.fingerprint"])
def test_refuses_an_eval_that_records_no_samples(tmp_path, capsys, missing):
    ref = write_eval(tmp_path / "teacher.json", PPL["teacher"])
    old = write_eval(tmp_path / "old.json", PPL["KD"], changes={missing: None})
    assert run_tool("report", ["--out", str(tmp_path / "r.md"), "--eval", f"T={ref}",
                             "--eval", f"O={old}"]) == 2
    err = capsys.readouterr().err
    name = missing if "." not in missing else "domains." + missing
    assert f"{old}: records no {name}" in err and "re-run megatron-ddk eval" in err


def test_report_states_its_split(report, tmp_path):
    path, rep = report
    assert rep["evaluation"]["split"] == "test" and rep["evaluation"]["seq_length"] == SEQ
    assert rep["evaluation"]["samples"] == {"a": 1, "b": 3, "c": 6}
    text = path.read_text()
    assert "## Per-domain test perplexity (lower is better)" in text
    assert "same **test** split (held out: never read by training or DDK): 1/3/6 samples x " \
           "100 tokens per domain" in text
    valid = [f"{n}={write_eval(tmp_path / f'{n}.json', p, changes={'split': 'valid'})}"
             for n, p in PPL.items()]
    out = tmp_path / "v" / "report.md"
    assert run_tool("report", ["--out", str(out)] + sum((["--eval", e] for e in valid), [])) == 0
    assert "## Per-domain valid perplexity" in out.read_text()
    assert "DDK's steering set" in out.read_text()
