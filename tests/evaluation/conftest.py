"""Session fixture: a tiny corpus with a test split, its SentencePiece tokenizer (under a name
other than tokenizer.model), a briefly trained student, and its Hugging Face export."""

import os

import pytest

from megatron_ddk.testing import tiny_run

DOMAINS = "python_code,english_prose,c_headers,licenses"


@pytest.fixture(scope="session")
def student(tmp_path_factory):
    """{'root', 'manifest', 'tokenizer', 'ckpt', 'config', 'hf'}."""
    root = str(tmp_path_factory.mktemp("student"))
    corpus = os.path.join(root, "corpus")
    tiny_run.run_tool(["tools/build_demo_corpus.py", "--output-dir", corpus, "--max-mb", "0.12",
                       "--min-mb", "0.06", "--max-doc-kb", "8", "--num-domains", "4",
                       "--domains", DOMAINS])
    tokenizer = os.path.join(root, "tokenizer", "tiny_sp.model")
    tiny_run.run_tool(["tools/build_domains.py", "--input", corpus, "--output-dir",
                       os.path.join(root, "datasets"), "--tokenizer-model", tokenizer,
                       "--train-tokenizer", "--vocab-size", "512", "--valid-samples", "8",
                       "--valid-seq-length", "32", "--workers", "1",
                       "--min-heldout-documents", "1"])
    manifest = os.path.join(root, "datasets", "manifest.yaml")
    cfg = tiny_run.run_config(manifest, os.path.join(root, "run"), policy="static",
                              train_iters=6, interval=3)
    config = tiny_run.write_config(cfg, os.path.join(root, "student.yaml"))
    tiny_run.train(config)
    hf = os.path.join(root, "hf")
    tiny_run.run_tool(["tools/export_hf.py", "--load", cfg["checkpoint"]["save"], "--out", hf,
                       "--dtype", "float32"])
    return {"root": root, "manifest": manifest, "tokenizer": tokenizer, "config": config,
            "ckpt": cfg["checkpoint"]["save"], "hf": hf}
