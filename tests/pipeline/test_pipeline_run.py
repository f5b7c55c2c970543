"""`megatron-ddk pipeline` end to end (smoke sizes of examples/my_data/pipeline.yaml) on a corpus
built at test time: the report on the test split, one run folder per arm x seed, a Hugging Face
export that transformers loads and generates from; a rerun skips every stage; a pipeline
SIGKILLed during a training stage and run again ends with the same numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.pipeline.corpus import build_corpus

pytestmark = pytest.mark.slow  # whole pipeline runs (minutes on 2 CPU cores)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "my_data", "pipeline.yaml")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _pipeline(corpus, out, *extra, check=True, **kw):
    argv = [sys.executable, "-m", "megatron_ddk.cli", "pipeline", "--config", CONFIG,
            "--corpus", str(corpus), "--out", str(out), "--smoke", *extra]
    if not check:
        return subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kw)
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    # mcore_source: two documents of >= 100 KB, cut into pieces for the held-out draw
    corpus = build_corpus(str(root / "corpus"), max_bytes=60_000, max_doc_bytes=6_000,
                          long_domains={"mcore_source": 100_000})
    out = root / "out"
    t0 = time.time()
    proc = _pipeline(corpus, out)
    return {"root": root, "corpus": corpus, "out": out, "log": proc.stderr + proc.stdout,
            "seconds": time.time() - t0}


def _evals(out):
    return {p: json.load(open(os.path.join(out, "eval", p)))
            for p in sorted(os.listdir(os.path.join(out, "eval"))) if p.endswith(".json")}


def test_report_on_test_split_and_run_folders(done):
    out = done["out"]
    report = json.load(open(out / "report.json"))
    columns = report["table"]["columns"]
    assert columns == ["teacher", "student_before", "CPT", "KD", "DDK"]
    assert sorted(report["table"]["domains"]) == ["debian_copyright", "mcore_source",
                                                  "package_docs"]
    for arm in ("CPT", "KD", "DDK"):
        run = out / "runs" / arm / "seed1234"
        assert (run / "metrics.jsonl").is_file() and (run / "ckpt").is_dir()
    for name, result in _evals(out).items():
        assert result["split"] == "test", name
    assert "test" in (out / "report.md").read_text()
    # the steering-fidelity table is there without being asked for: DDK steers on valid, the
    # evals are format 3 on test (8 samples a domain: the verdicts are whatever was measured)
    fidelity = report["fidelity"]
    assert fidelity["available"], fidelity.get("reason")
    assert sorted(fidelity["per_domain"]) == sorted(report["table"]["domains"])
    for row in fidelity["per_domain"].values():
        assert row["valid_log_se"] is not None and row["test_samples"] == 8
        assert row["status"] in ("agree", "agree, beyond noise", "differ beyond noise",
                                 "differ within noise")
    text = (out / "report.md").read_text()
    assert "## Steering fidelity" in text
    for name in fidelity["flagged"]:  # the report says which domains differ, and why
        assert fidelity["per_domain"][name]["verdict"] in text
    # the long documents were cut: held-out pieces from both sources, above the smoke floor
    from megatron_ddk.data.manifest import load_manifest

    m = load_manifest(str(out / "data" / "datasets" / "manifest.yaml"))
    long = next(d for d in m.domains if d.name == "mcore_source")
    assert long.num_valid_sources == 2 and long.num_valid_documents >= 4
    assert long.num_test_sources == 2 and long.num_test_documents >= 4


def test_hf_export_loads_and_generates(done):
    transformers = pytest.importorskip("transformers")
    import torch

    folder = done["out"] / "hf" / "DDK-seed1234"
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    ids = tok("Permission is hereby granted", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert isinstance(tok.decode(gen[0]), str)


def test_rerun_skips_every_stage(done):
    t0 = time.time()
    proc = _pipeline(done["corpus"], done["out"])
    log = proc.stderr + proc.stdout
    assert "0 stage(s) ran" in log, log[-2000:]
    assert "running ..." not in log
    assert time.time() - t0 < 60


def test_sigkill_during_training_then_rerun_gives_same_numbers(done):
    """The KD arm is redone from scratch (its stamp and outputs removed), SIGKILLed once it has
    saved a checkpoint, and resumed by the same command: its test-split numbers equal those of
    the uninterrupted first run."""
    import shutil

    out = done["out"]
    reference = json.load(open(out / "eval" / "KD_seed1234.json"))
    shutil.rmtree(out / "runs" / "KD")
    for path in (out / "stamps" / "KD_seed1234.json", out / "eval" / "KD_seed1234.json"):
        path.unlink()
    proc = _pipeline(done["corpus"], out, check=False)
    stamp = out / "stamps" / "KD_seed1234.json"
    ckpt_latest = out / "runs" / "KD" / "seed1234" / "ckpt" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if stamp.exists() and ckpt_latest.exists():
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the pipeline ended before the KD stage saved a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.load(open(stamp))["state"] == "running"
    log = _pipeline(done["corpus"], out)
    text = log.stderr + log.stdout
    assert any("KD/seed1234" in line and "resuming" in line for line in text.splitlines()), text
    ours = json.load(open(out / "eval" / "KD_seed1234.json"))
    assert ours["domains"].keys() == reference["domains"].keys()
    for domain, r in reference["domains"].items():
        assert ours["domains"][domain]["loss"] == r["loss"], domain
