"""tools/plan_memory.py takes the vocabulary from a domain manifest (--manifest, or the config's
data.manifest): padded rows and embedding bytes against a hand computation, the note when a
preset pins many more rows than the tokenizer has, and the refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from megatron_ddk.cli import run_tool
from megatron_ddk.data.manifest import DomainEntry, DomainManifest, save_manifest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
QWEN_14_TO_18 = os.path.join(ROOT, "examples", "presets", "qwen1.5_14b_to_1.8b.yaml")
HIDDEN, FFN = 2048, 8192


def _manifest(folder, vocab_size):
    """A real one-domain manifest whose tokenizer has vocab_size entries."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = {}
    for split in ("train", "valid"):
        prefix = os.path.join(folder, "d", split)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        builder.add_document(np.arange(10), [10])
        builder.finalize(prefix + ".idx")
        prefixes[split] = prefix
    tok = os.path.join(folder, "tok.model")
    open(tok, "wb").close()
    m = DomainManifest(path="", tokenizer_model=tok, tokenizer_hash="sha256:" + "0" * 64,
                       vocab_size=vocab_size, domains=[DomainEntry(
                           name="d", train_prefixes=[prefixes["train"]],
                           valid_prefix=prefixes["valid"], num_train_tokens=10,
                           num_train_documents=1, num_valid_tokens=10, num_valid_documents=1)])
    path = os.path.join(folder, "manifest.yaml")
    save_manifest(m, path)
    return path


def _config(folder, manifest=None, **model):
    """A small student-only run config (no padded_vocab_size)."""
    cfg = {"model": {"num_layers": 2, "hidden_size": HIDDEN, "num_attention_heads": 16,
                     "ffn_hidden_size": FFN, **model},
           "data": {"seq_length": 128, **({"manifest": manifest} if manifest else {})},
           "train": {"micro_batch_size": 1, "global_batch_size": 1, "train_iters": 1}}
    path = os.path.join(folder, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _weights_gib(out):
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("weights"))
    return float(line.split()[-3])  # the student column


def _bf16_gib(padded_vocab):
    """Student weights by hand: embedding + untied output layer (2 x V x h), per layer QKV +
    projection (4 h^2, MHA) + SwiGLU MLP (3 h f) + two RMSNorms, the final norm; 2 bytes each."""
    layers = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN) + HIDDEN
    return (2 * padded_vocab * HIDDEN + layers) * 2 / 2**30


def test_vocabulary_from_the_manifest(tmp_path, capsys):
    manifest = _manifest(str(tmp_path), 2000)
    cfg = _config(str(tmp_path))
    assert run_tool("plan-memory", ["--config", cfg, "--manifest", manifest]) == 0
    out = capsys.readouterr().out
    # 2000 padded to a multiple of make_vocab_size_divisible_by (128) x TP (1): 2048
    assert "padded vocabulary 2,048" in out
    assert f"vocabulary 2,000 entries from manifest {manifest}" in out
    assert _weights_gib(out) == pytest.approx(_bf16_gib(2048), abs=0.006)  # 0.27 GiB
    # the same manifest named by the config's data.manifest: the same plan
    assert run_tool("plan-memory", ["--config", _config(str(tmp_path), manifest=manifest)]) == 0
    again = capsys.readouterr().out
    assert f"vocabulary 2,000 entries from manifest {manifest}" in again
    assert _weights_gib(again) == _weights_gib(out)
    # a bigger tokenizer: bigger plan
    big = _manifest(str(tmp_path / "big"), 100_000)
    assert run_tool("plan-memory", ["--config", cfg, "--manifest", big]) == 0
    out = capsys.readouterr().out
    assert "padded vocabulary 100,096" in out
    assert _weights_gib(out) == pytest.approx(_bf16_gib(100_096), abs=0.006)  # 1.01 GiB


def test_pinned_rows_are_noted_and_bad_combinations_refused(tmp_path, capsys):
    small = _manifest(str(tmp_path / "small"), 2000)
    assert run_tool("plan-memory", ["--config", QWEN_14_TO_18, "--manifest", small]) == 0
    out = capsys.readouterr().out
    assert "padded vocabulary 152,064" in out
    assert "padded_vocab_size pins 152,064 rows, 76.0x the tokenizer" in out
    huge = _manifest(str(tmp_path / "huge"), 200_000)
    assert run_tool("plan-memory", ["--config", QWEN_14_TO_18, "--manifest", huge]) == 2
    assert "is smaller than the tokenizer vocabulary 200000" in capsys.readouterr().err
    cfg = _config(str(tmp_path), vocab_size=3000)
    assert run_tool("plan-memory", ["--config", cfg, "--manifest", small]) == 2
    assert "model.vocab_size=3000 but the manifest" in capsys.readouterr().err
    assert run_tool("plan-memory", ["--config", _config(str(tmp_path)), "--manifest", small,
                      "--vocab-size", "2000"]) == 2
    assert "pass one" in capsys.readouterr().err
    assert run_tool("plan-memory", ["--config", _config(str(tmp_path)), "--manifest",
                      str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml does not exist" in capsys.readouterr().err
