"""The quickstart (a pipeline config) and the DDK study that extends it, at smoke sizes.

The quickstart's smoke variant runs every stage (demo corpus, tokenizer, train/valid/test
datasets, teacher, student, CPT, KD, DDK, test-split evaluation, report, HF export); the study's
smoke variant then reuses its data, teacher, student and seed-1234 arms (their stamps match) and
adds the ablation arms and a second seed, and its report carries means, intervals and paired
differences over the seeds."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # whole pipeline runs (minutes on 2 CPU cores)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(argv):
    proc = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    log = _run(["tools/quickstart.py", "--smoke", "--out", str(out)])
    return out, log


def test_quickstart_smoke(quickstart):
    out, _ = quickstart
    report = json.load(open(out / "report.json"))
    ppl = report["table"]["ppl"]
    domains = report["table"]["domains"]
    assert len(domains) >= 4
    for d in domains:  # the teacher beats the starting student everywhere
        assert ppl["teacher"][d] < ppl["student_before"][d]
    for name in [n for n in os.listdir(out / "eval") if n.endswith(".json")]:
        assert json.load(open(out / "eval" / name))["split"] == "test"
    text = (out / "report.md").read_text()
    for heading in ("Stage timing", "DDK compared with KD"):
        assert heading in text
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    ddk = [json.loads(line) for line in open(out / "runs" / "DDK" / "seed1234" / "metrics.jsonl")]
    assert len([r for r in ddk if r["kind"] == "interval"]) == 3
    assert (out / "hf" / "DDK-seed1234" / "config.json").is_file()


def test_study_smoke_reuses_the_quickstart_and_reports_intervals(quickstart):
    out, _ = quickstart
    log = _run(["-m", "megatron_ddk.cli", "pipeline", "--config", "examples/study/pipeline.yaml",
                "--smoke", "--out", str(out)])
    for reused in ("teacher", "student", "CPT/seed1234", "datasets"):
        assert any(reused in line and "skipped" in line for line in log.splitlines()), reused
    # the study's KD / DDK arms read one offline teacher store per seed (teacher_store.per_seed),
    # so they are not the quickstart's online-teacher runs: the stores are built, the arms rerun
    assert any("teacher_store/" in line and "done" in line for line in log.splitlines()), log
    assert not any("KD/seed1234" in line and "skipped" in line for line in log.splitlines())
    report = json.load(open(out / "report.json"))
    study = report["study"]
    assert set(study["arms"]) == {"DDK", "DDK_noFS", "ES", "KD", "CPT", "DDK_train"}
    for arm in study["arms"].values():
        assert arm["seeds"] == [1234, 1235]
        assert arm["metrics"]["pooled_ppl"]["half_width"] is not None
    assert {"DDK-KD", "DDK-ES", "KD-CPT"} <= set(study["differences"])
    # paired difference recomputed from the per-column table
    table = report["table"]
    diffs = [table["pooled_ppl"][f"DDK@{s}"] - table["pooled_ppl"][f"KD@{s}"] for s in (1234, 1235)]
    assert study["differences"]["DDK-KD"]["metrics"]["pooled_ppl"]["mean"] == \
        pytest.approx(sum(diffs) / 2)
    assert report["costs"]["DDK_train"]["ddk_eval_s"]["mean"] == 0.0
    text = (out / "report.md").read_text()
    assert "Arms over seeds" in text and "95%" in text
    assert (out / "plots" / "study_weights.png").is_file()
