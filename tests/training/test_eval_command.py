"""`megatron-ddk eval`: the held-out split (test by default), the sample count and the samples'
fingerprints it records, --samples, the model taken from the checkpoint when the config's model
differs (the teacher evaluated through the student's config, against a dense float64 CE of the
same checkpoint built from its explicit config), every sample's mean CE (format 3) against the
same dense reference per sample and at DP = 2 against DP = 1, and the refusal of a manifest
without a test split."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml

from megatron_ddk.testing import tiny_run
from megatron_ddk.testing.multiproc import run_distributed

SEQ = 32


def _student_config(tiny, root):
    cfg = tiny_run.run_config(tiny["manifest"], os.path.join(root, "student"), policy="static",
                              seq_length=SEQ, extra={"checkpoint": {"save": None}})
    return tiny_run.write_config(cfg, os.path.join(root, "student.yaml"))


def _teacher_config(tiny, root):
    cfg = tiny_run.run_config(tiny["manifest"], os.path.join(root, "teacher"), policy="static",
                              seq_length=SEQ, extra={"model": dict(tiny_run.TEACHER),
                                                     "checkpoint": {"save": None}})
    return tiny_run.write_config(cfg, os.path.join(root, "teacher.yaml"))


def _v1_manifest(tiny, root):
    """A copy of the tiny manifest as a version-1 file (no test split), absolute paths."""
    from megatron_ddk.data.manifest import load_manifest

    m = load_manifest(tiny["manifest"])
    raw = {"version": 1, "tokenizer": {"model": m.tokenizer_model, "hash": m.tokenizer_hash,
                                       "vocab_size": m.vocab_size},
           "domains": [{"name": d.name, "train_prefixes": d.train_prefixes,
                        "valid_prefix": d.valid_prefix,
                        **{k: getattr(d, k) for k in ("num_train_tokens", "num_train_documents",
                                                      "num_valid_tokens", "num_valid_documents")}}
                       for d in m.domains]}
    path = os.path.join(root, "v1", "manifest.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def _dense_ce(model, samples, vocab_size):
    """Per-domain mean CE over every sample, and every sample's own mean CE (per domain, sample
    order): one sample at a time, float64 over the full vocabulary (reference)."""
    import torch

    from megatron_ddk.data.mixture import collate

    out, per_sample = [], []
    with torch.no_grad():
        for d, ds in enumerate(samples):
            total = count = 0.0
            per_sample.append([])
            for i in range(len(ds)):
                batch = collate([(d, i)], samples)
                logits = model(batch["tokens"], batch["position_ids"], None)
                logp = torch.log_softmax(logits[..., :vocab_size].double(), -1)
                ce = -logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
                total += float(ce.sum())
                count += ce.numel()
                per_sample[-1].append(float(ce.sum()) / ce.numel())
            out.append(total / count)
    return out, per_sample


def _evaluations(rank, world, tiny, root):
    from megatron_ddk.config import load_config, static_checks
    from megatron_ddk.data.domain_datasets import build_heldout_samples
    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.tokenizer import build_tokenizer
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model, read_metadata, resolve_checkpoint
    from megatron_ddk.parallel import destroy, initialize
    from megatron_ddk.training.evaluation_command import evaluate_checkpoint

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("megatron_ddk.training.evaluation_command").addHandler(handler)
    logging.getLogger("megatron_ddk.training.evaluation_command").setLevel(logging.INFO)
    ctx = initialize(1, 1, seed=1234)
    out = {}
    try:
        student = static_checks(load_config(_student_config(tiny, root)), 1)
        teacher = static_checks(load_config(_teacher_config(tiny, root)), 1)
        ckpt = tiny["teacher"]
        out["from_ckpt"] = evaluate_checkpoint(student, ctx, ckpt)
        out["log"] = list(lines)
        out["explicit"] = evaluate_checkpoint(teacher, ctx, ckpt)
        out["valid"] = evaluate_checkpoint(student, ctx, ckpt, split="valid")
        out["three"] = evaluate_checkpoint(student, ctx, ckpt, num_samples=3)
        manifest = load_manifest(tiny["manifest"])
        samples = build_heldout_samples(manifest, build_tokenizer(manifest.tokenizer_model), SEQ,
                                        None, "test")
        folder, _ = resolve_checkpoint(ckpt)
        model = build_gpt_model(teacher.model, ctx, read_metadata(folder)["padded_vocab_size"],
                                bf16=False)
        load_model(folder, model)
        model.eval()
        out["dense"], out["dense_samples"] = _dense_ce(model, samples, manifest.vocab_size)
        old = static_checks(load_config(_student_config(tiny, root),
                                        [f"data.manifest={_v1_manifest(tiny, root)}"]), 1)
        try:
            evaluate_checkpoint(old, ctx, ckpt)
            out["v1_error"] = None
        except ValueError as exc:
            out["v1_error"] = str(exc)
        out["v1_valid"] = evaluate_checkpoint(old, ctx, ckpt, split="valid")
    finally:
        destroy()
    return out


def _evaluation_dp2(rank, world, tiny, root):
    from megatron_ddk.config import load_config, static_checks
    from megatron_ddk.parallel import destroy, initialize
    from megatron_ddk.training.evaluation_command import evaluate_checkpoint

    ctx = initialize(1, 1, seed=1234)
    try:
        assert ctx.dp_size == 2
        student = static_checks(load_config(_student_config(tiny, root)), world)
        return evaluate_checkpoint(student, ctx, tiny["teacher"])
    finally:
        destroy()


@pytest.fixture(scope="module")
def evals(tiny, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval"))
    return run_distributed(_evaluations, 1, tiny, root, timeout=600)[0]


@pytest.fixture(scope="module")
def evals_dp2(tiny, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval_dp2"))
    return run_distributed(_evaluation_dp2, 2, tiny, root, timeout=600)


def test_teacher_through_the_student_config_matches_a_dense_reference(evals):
    a, b = evals["from_ckpt"], evals["explicit"]
    assert a["model"]["source"] == "checkpoint" and b["model"]["source"] == "config"
    assert a["model"]["hidden_size"] == tiny_run.TEACHER["hidden_size"]
    assert len([ln for ln in evals["log"] if "building the model megatron_ddk.json records"
                in ln]) == 1
    assert "hidden_size: checkpoint 64 vs config 32" in evals["log"][0]
    for i, name in enumerate(a["domains"]):
        assert a["domains"][name]["loss"] == pytest.approx(b["domains"][name]["loss"], abs=1e-6)
        assert a["domains"][name]["loss"] == pytest.approx(evals["dense"][i], abs=1e-5)
    assert a["fingerprint"] == b["fingerprint"]


def test_records_split_counts_and_fingerprints(evals, tiny):
    from megatron_ddk.data.manifest import load_manifest

    manifest = load_manifest(tiny["manifest"])
    test, valid, three = evals["from_ckpt"], evals["valid"], evals["three"]
    assert (test["split"], valid["split"], test["seq_length"]) == ("test", "valid", SEQ)
    assert test["format"] == 3 and test["fingerprint"].startswith("sha256:")
    for d in manifest.domains:
        every = (d.num_test_tokens - 1) // SEQ  # all test samples by default
        assert test["domains"][d.name]["samples"] == every
        assert test["domains"][d.name]["tokens"] == every * SEQ
        assert valid["domains"][d.name]["samples"] == 8  # ddk.valid_samples_per_domain
        assert three["domains"][d.name]["samples"] == 3
        assert three["domains"][d.name]["tokens"] == 3 * SEQ
        prints = {r["domains"][d.name]["fingerprint"] for r in (test, valid, three)}
        assert len(prints) == 3
    assert len({test["fingerprint"], valid["fingerprint"], three["fingerprint"]}) == 3
    assert test["samples_requested"] is None and valid["samples_requested"] == 8


def test_per_sample_losses_match_a_dense_reference_and_dp2(evals, evals_dp2):
    """sample_losses[i] = sample i's mean CE, manifest sample order. Against the float64 dense
    reference: 1e-5, as for the domain means (float32 logits and CE). DP = 2 evaluates every
    sample in a micro-batch of the same [b, s] shape, only with other companions, so the rows
    can differ by float32 reassociation at most (~1e-7 x CE ~ 5 nats): 2e-6."""
    one = evals["from_ckpt"]
    assert one["format"] == 3
    rank0, rank1 = evals_dp2
    assert rank0["domains"].keys() == one["domains"].keys()
    for i, name in enumerate(one["domains"]):
        dom = one["domains"][name]
        dense = evals["dense_samples"][i]
        assert len(dom["sample_losses"]) == dom["samples"] == len(dense) > 2
        assert dom["sample_losses"] == pytest.approx(dense, abs=1e-5)
        assert dom["sample_tokens"] == [SEQ] * dom["samples"]
        # the domain mean is the token-weighted mean of its samples
        assert dom["loss"] == pytest.approx(sum(dom["sample_losses"]) / dom["samples"],
                                            abs=1e-12)
        for rank in (rank0, rank1):  # every rank holds every sample (one all_reduce)
            two = rank["domains"][name]
            assert two["sample_losses"] == pytest.approx(dom["sample_losses"], abs=2e-6)
            assert two["sample_tokens"] == dom["sample_tokens"]
            assert two["loss"] == pytest.approx(dom["loss"], abs=2e-6)
    assert rank0["fingerprint"] == one["fingerprint"]


def test_manifest_without_test_split(evals):
    assert "(version 1) has no test split: rebuild it with `megatron-ddk build-domains`" in \
        evals["v1_error"] and "--split valid" in evals["v1_error"]
    # the valid split of the old manifest is the same samples as the new one's
    assert evals["v1_valid"]["fingerprint"] == evals["valid"]["fingerprint"]


def test_cli_writes_the_json_and_refuses_bad_samples(evals, tiny, tmp_path):
    cfg = _student_config(tiny, str(tmp_path))
    out = str(tmp_path / "eval.json")
    printed = tiny_run.run_tool(["-m", "megatron_ddk.cli", "eval", "--config", cfg, "--load",
                                 tiny["teacher"], "--output", out, "--split", "valid",
                                 "--samples", "5"])
    result = json.load(open(out))
    assert result["split"] == "valid" and result["samples_requested"] == 5
    assert all(r["samples"] == 5 for r in result["domains"].values())
    assert "split valid, seq_length 32" in printed
    # 8 valid samples per domain were the training evaluation's: the first 5 are a prefix of
    # them, so the 5-sample fingerprint differs from the 8-sample one
    assert result["fingerprint"] != evals["valid"]["fingerprint"]
    with pytest.raises(RuntimeError, match="--samples 0: must be >= 1"):
        tiny_run.run_tool(["-m", "megatron_ddk.cli", "eval", "--config", cfg, "--load",
                           tiny["teacher"], "--samples", "0"])
    # an --output that cannot be written is refused before the evaluation runs, in one line
    # (/proc refuses new files even to root)
    with pytest.raises(RuntimeError, match=r"--output=/proc/ddk_eval: cannot write there"):
        tiny_run.run_tool(["-m", "megatron_ddk.cli", "eval", "--config", cfg, "--load",
                           tiny["teacher"], "--output", "/proc/ddk_eval/eval.json"])
