"""The quickstart's smoke variant: every stage (corpus, tokenizer, datasets, teacher, student,
CPT, KD, DDK, evaluation, report) on a tiny budget, checked on the report's measured numbers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_quickstart_smoke(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    proc = subprocess.run([sys.executable, "tools/quickstart.py", "--smoke", "--out", str(out),
                           "--data", str(data)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    ppl = report["table"]["ppl"]
    domains = report["table"]["domains"]
    assert len(domains) >= 4
    for d in domains:  # the teacher beats the starting student everywhere
        assert ppl["teacher"][d] < ppl["student_before"][d]
        for run in ("CPT", "KD", "DDK"):  # each continuation improves on the start
            assert ppl[run][d] < ppl["student_before"][d], (run, d)
    text = (out / "report.md").read_text()
    for heading in ("Per-domain validation perplexity", "Stage timing", "DDK compared with KD"):
        assert heading in text
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    ddk = [json.loads(line) for line in open(out / "ddk" / "metrics.jsonl")]
    assert len([r for r in ddk if r["kind"] == "interval"]) == 3
