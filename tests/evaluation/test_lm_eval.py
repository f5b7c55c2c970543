"""`megatron-ddk lm-eval` on a tiny exported student with the local tasks.

1. lm-eval's numbers (token perplexity of the rolling task, acc and acc_norm of the continuation
   task) equal a direct transformers computation of the same metric on the same items.
2. lm-eval's rolling perplexity equals `megatron-ddk eval`'s test perplexity on the same tokens:
   the test builds a domain whose test documents are [eos, 31 tokens], so with seq_length 32
   every eval window is [eos, document, eos] and predicts exactly the tokens lm-eval scores for
   that document (its text + eos text, read after prefix_token_id = eos). Megatron's windows
   leave out the last document of its shuffled order (a window needs one token past its end),
   so the documents are matched window by window and lm-eval's per-document log-likelihoods
   (log_samples) of those documents are aggregated.
3. Errors: unknown task, a task whose data needs a download (offline), lm-eval missing.
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is the `eval` extra")

from megatron_ddk.testing import tiny_run  # noqa: E402
from megatron_ddk.testing.commands import run_command  # noqa: E402

ROOT = tiny_run.ROOT
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
DOMAIN = "python_code"


def _cli(args, env=None, fresh_interpreter=False):
    """`megatron-ddk ARGS` (forked from the tests' fork server unless fresh_interpreter: the
    server has torch and Megatron-Core imported, never lm_eval, datasets or transformers, so
    their offline settings are read from this env); .returncode, .stderr (with stdout)."""
    full = dict(os.environ, OMP_NUM_THREADS="1", **OFFLINE, **(env or {}))
    argv = [sys.executable, "-m", "megatron_ddk.cli"] + args
    if fresh_interpreter:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env=full)
        return SimpleNamespace(returncode=proc.returncode, stderr=proc.stderr + proc.stdout)
    code, output = run_command(argv, full, ROOT, 900)
    return SimpleNamespace(returncode=code, stderr=output)


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _sequence_ll(model, prefix_ids, target_ids):
    """sum log P(target | prefix) with one transformers forward."""
    ids = torch.tensor([prefix_ids + target_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    pos = torch.arange(len(prefix_ids) - 1, ids.shape[1] - 1)
    return float(logp[pos, torch.tensor(target_ids)].sum())


def _encode(sp, text, eos_text):
    """The exported tokenizer's rule: a leading/trailing eos text is the eos token."""
    head, tail = [], []
    if text.startswith(eos_text):
        head, text = [sp.eos_id()], text[len(eos_text):]
    if text.endswith(eos_text):
        tail, text = [sp.eos_id()], text[:-len(eos_text)]
    return head + sp.encode(text) + tail


@pytest.fixture(scope="module")
def tasks(student, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tasks") / "tasks")
    tiny_run.run_tool(["tools/build_lm_eval_tasks.py", "--manifest", student["manifest"], "--out",
                       out, "--max-docs", "4", "--max-doc-tokens", "60", "--context-tokens",
                       "20", "--continuation-tokens", "8", "--max-items", "12"])
    return out


@pytest.mark.timeout(1200)
def test_lm_eval_matches_a_direct_transformers_computation(student, tasks, tmp_path):
    import sentencepiece
    from transformers import AutoModelForCausalLM

    limit = 6
    out = str(tmp_path / "r.json")
    proc = _cli(["lm-eval", "--load", student["ckpt"], "--include-path", tasks, "--tasks",
                 f"ddk_ppl_{DOMAIN},ddk_mc_{DOMAIN}", "--limit", str(limit), "--output", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(out))
    assert res["tokenizer_hash"] == json.load(open(os.path.join(
        student["hf"], "megatron_ddk_export.json")))["tokenizer_hash"]
    assert res["versions"][f"ddk_ppl_{DOMAIN}"] == 1.0 and res["prefix_token_id"] == 2
    model = AutoModelForCausalLM.from_pretrained(student["hf"], dtype=torch.float32).eval()
    sp = sentencepiece.SentencePieceProcessor(model_file=student["tokenizer"])
    eos, eos_text = sp.eos_id(), sp.IdToPiece(sp.eos_id())
    # rolling: every piece fits one window; scored after prefix_token_id = eos
    ll = n = 0.0
    for row in _rows(os.path.join(tasks, f"{DOMAIN}.ppl.jsonl"))[:limit]:
        ids = _encode(sp, row["target"], eos_text)
        assert len(ids) == row["num_tokens"]
        ll += _sequence_ll(model, [eos], ids)
        n += len(ids)
    got = res["metrics"][f"ddk_ppl_{DOMAIN}"]["token_perplexity"]
    assert got == pytest.approx(math.exp(-ll / n), rel=1e-5)
    # multiple choice: lm-eval's scoring rule (trailing context space moves to the choice)
    correct = correct_norm = 0
    items = _rows(os.path.join(tasks, f"{DOMAIN}.mc.jsonl"))[:limit]
    for item in items:
        context, lls = item["context"], []
        for choice in item["choices"]:
            ctx, cont = context.rstrip(), context[len(context.rstrip()):] + choice
            ctx_ids = _encode(sp, ctx, eos_text)
            whole = _encode(sp, ctx + cont, eos_text)
            lls.append(_sequence_ll(model, ctx_ids, whole[len(ctx_ids):]))
        lens = np.array([float(len(c)) for c in item["choices"]])
        correct += int(np.argmax(lls)) == item["label"]
        correct_norm += int(np.argmax(np.array(lls) / lens)) == item["label"]
    mc = res["metrics"][f"ddk_mc_{DOMAIN}"]
    assert mc["acc"] == pytest.approx(correct / len(items), abs=1e-9)
    assert mc["acc_norm"] == pytest.approx(correct_norm / len(items), abs=1e-9)


def _constructed_manifest(student, folder, num_docs=12, seq=32):
    """A copy of the manifest whose DOMAIN valid and test splits are [eos, 31 tokens] documents
    cut from its real test documents (pieces that round-trip through the tokenizer)."""
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_ddk.data.manifest import load_manifest, save_manifest

    m = load_manifest(student["manifest"])
    sp = sentencepiece.SentencePieceProcessor(model_file=m.tokenizer_model)
    entry = next(d for d in m.domains if d.name == DOMAIN)
    src = IndexedDataset(entry.test_prefix, mmap=True)
    docs = []
    for i in range(len(src)):
        ids = [int(t) for t in np.asarray(src[i])[:-1]]
        for a in range(0, len(ids) - seq, seq - 1):
            chunk = ids[a:a + seq - 1]
            if sp.eos_id() not in chunk and sp.encode(sp.decode(chunk)) == chunk:
                docs.append([sp.eos_id()] + chunk)
    docs = docs[:num_docs]
    assert len(docs) == num_docs
    prefix = os.path.join(folder, "constructed")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(prefix + ".idx")
    for split in ("valid", "test"):
        setattr(entry, f"{split}_prefix", prefix)
        setattr(entry, f"num_{split}_tokens", num_docs * seq)
        setattr(entry, f"num_{split}_documents", num_docs)
    path = os.path.join(folder, "manifest.yaml")
    save_manifest(m, path)
    return path, docs


@pytest.mark.timeout(1200)
def test_rolling_perplexity_equals_megatron_ddk_eval(student, tmp_path):
    from megatron_ddk.data.domain_datasets import build_heldout_samples
    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.tokenizer import build_tokenizer
    from megatron_ddk.evaluation.lm_eval import run_lm_eval

    manifest, docs = _constructed_manifest(student, str(tmp_path))
    cache = str(tmp_path / "cache")
    proc = _cli(["eval", "--config", student["config"], "--load", student["ckpt"], "--split",
                 "test", "--output", str(tmp_path / "eval.json"), f"data.manifest={manifest}",
                 f"data.cache_dir={cache}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.load(open(tmp_path / "eval.json"))["domains"][DOMAIN]
    # which documents megatron-ddk's windows cover (each window is [eos, doc, eos])
    m = load_manifest(manifest)
    samples = build_heldout_samples(m, build_tokenizer(m.tokenizer_model), 32, cache, "test",
                                    None)[m.names().index(DOMAIN)]
    by_tokens = {tuple(d): i for i, d in enumerate(docs)}
    covered = []
    for k in range(len(samples)):
        tokens = np.asarray(samples[k]["tokens"]).tolist()
        assert samples[k]["labels"][-1] == 2 and tuple(tokens) in by_tokens
        covered.append(by_tokens[tuple(tokens)])
    assert ev["tokens"] == 32 * len(covered) and len(covered) == len(docs) - 1
    res = run_lm_eval(student["ckpt"], [f"ddk_ppl_{DOMAIN}"], manifest=manifest,
                      log_samples=True, batch_size=4)
    lls = {s["doc"]["doc_index"]: s["filtered_resps"][0] if not isinstance(
        s["filtered_resps"][0], (list, tuple)) else s["filtered_resps"][0][0]
        for s in res["samples"][f"ddk_ppl_{DOMAIN}"]}
    assert sorted(lls) == list(range(len(docs)))
    ppl = math.exp(-sum(float(lls[i]) for i in covered) / (32 * len(covered)))
    assert ppl == pytest.approx(ev["ppl"], rel=0.01)
    assert abs(ppl / ev["ppl"] - 1) < 1e-4  # in fact the same computation
    all_docs = res["metrics"][f"ddk_ppl_{DOMAIN}"]["token_perplexity"]
    assert all_docs == pytest.approx(math.exp(-sum(float(v) for v in lls.values())
                                              / (32 * len(docs))), rel=1e-9)


def test_unknown_and_offline_tasks_are_named(student, tmp_path):
    proc = _cli(["lm-eval", "--load", student["ckpt"], "--tasks", "ddk_ppl_nosuch,arc_easyy"])
    assert proc.returncode == 2
    assert "unknown lm-eval task(s): ddk_ppl_nosuch" in proc.stderr
    assert "arc_easyy (did you mean arc_easy" in proc.stderr
    proc = _cli(["lm-eval", "--load", student["ckpt"], "--tasks", "arc_easy"])
    assert proc.returncode == 2
    assert "lm-eval task arc_easy cannot load its data: it needs the Hugging Face dataset" in \
        proc.stderr and "ai2_arc" in proc.stderr


def test_missing_lm_eval_names_the_extra(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "lm_eval.py").write_text("raise ImportError('blocked for the test')\n")
    proc = _cli(["lm-eval", "--load", str(tmp_path), "--tasks", "x"],
                env={"PYTHONPATH": str(blocker)}, fresh_interpreter=True)  # import-time path
    assert proc.returncode == 2 and "eval` extra" in proc.stderr
