"""A tiny but real end-to-end set-up for tests and smoke runs: corpus, tokenizer, domain
datasets, manifest, a briefly pre-trained teacher, and run configs around them.

Everything is built with the project's own tools (`megatron-ddk demo-corpus`,
`megatron-ddk build-domains`, `python -m megatron_ddk.train`), so a test that uses it exercises the
same path a user does. Sizes are chosen for seconds on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import yaml

from megatron_ddk.testing.commands import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUDENT = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
           "ffn_hidden_size": 64, "max_position_embeddings": 64}
TEACHER = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
           "ffn_hidden_size": 128, "max_position_embeddings": 64}


def run_tool(args: List[str], env: Optional[Dict[str, str]] = None, timeout: int = 600) -> str:
    """Run a repo command with this interpreter (forked from the warm fork server:
    testing/commands.py); raise with its output when it fails."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    code, output = run_command([sys.executable] + args, full_env, ROOT, timeout)
    if code != 0:
        raise RuntimeError(f"{' '.join(args)} exited {code}:\n{output[-8000:]}")
    return output


def load_script(relpath: str, name: Optional[str] = None):
    """Import a repository script (tools/..., bench/...) as a module, by its path from the root."""
    import importlib.util

    path = os.path.join(ROOT, relpath)
    name = name or os.path.splitext(os.path.basename(relpath))[0] + "_script"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_domains(folder: str, max_mb: float = 0.12, vocab_size: int = 512,
                       valid_samples: int = 8, seq_length: int = 32,
                       test_samples: Optional[int] = None) -> str:
    """Corpus (4 real-text domains) -> tokenizer -> train/valid/test datasets -> manifest;
    returns its path. test_samples defaults to valid_samples (0: no test split)."""
    corpus = os.path.join(folder, "corpus")
    run_tool(["-m", "megatron_ddk.cli", "demo-corpus", "--output-dir", corpus,
              "--max-mb", str(max_mb), "--min-mb", str(max_mb / 2), "--max-doc-kb", "8"])
    run_tool(["-m", "megatron_ddk.cli", "build-domains", "--input", corpus, "--output-dir",
              os.path.join(folder, "datasets"), "--tokenizer-model",
              os.path.join(folder, "tokenizer", "tiny.model"), "--train-tokenizer",
              "--vocab-size", str(vocab_size), "--valid-samples", str(valid_samples),
              "--valid-seq-length", str(seq_length), "--workers", "1",
              # sets of a few 33-token samples cannot hold build_domains' 16-document floor
              "--min-heldout-documents", "1"]
             + ([] if test_samples is None else ["--test-samples", str(test_samples)]))
    return os.path.join(folder, "datasets", "manifest.yaml")


def run_config(manifest: str, run_dir: str, *, teacher_load: Optional[str] = None,
               policy: str = "ddk", train_iters: int = 8, interval: int = 4,
               seq_length: int = 32, extra: Optional[dict] = None) -> dict:
    """A tiny run config (as plain data); `extra` is merged section by section."""
    cfg = {
        "model": dict(STUDENT),
        "data": {"manifest": manifest, "seq_length": seq_length},  # cache: the manifest's
        "ddk": {"policy": policy, "interval": interval, "valid_samples_per_domain": 8},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": train_iters,
                  "lr": 2.0e-3, "min_lr": 2.0e-4, "lr_warmup_iters": 2, "seed": 1234},
        "checkpoint": {"save": os.path.join(run_dir, "ckpt")},
        "logging": {"run_dir": run_dir, "log_interval": 1, "tensorboard": True},
    }
    if teacher_load:
        cfg["distill"] = {"teacher": dict(TEACHER), "teacher_load": teacher_load}
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(cfg: dict, path: str) -> str:
    """Write a config dict as YAML; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def train(config_path: str, nproc: int = 1, overrides: Optional[List[str]] = None,
          timeout: int = 600) -> str:
    """`python -m megatron_ddk.train` (under torchrun when nproc > 1); returns its output."""
    args = ["-m", "megatron_ddk.train", "--config", config_path] + list(overrides or [])
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + args
    return run_tool(args, timeout=timeout)


def pretrain_teacher(manifest: str, folder: str, train_iters: int = 20) -> str:
    """A teacher pre-trained briefly on the natural mixture (CPT); returns its checkpoint."""
    cfg = run_config(manifest, folder, policy="static", train_iters=train_iters, interval=10,
                     extra={"model": dict(TEACHER)})
    train(write_config(cfg, os.path.join(folder, "teacher.yaml")))
    return cfg["checkpoint"]["save"]
