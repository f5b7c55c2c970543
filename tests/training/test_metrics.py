"""training/metrics.py (metrics.jsonl reads as one run) and training/flops.py (FLOP accounting).

References are independent of the code under test: records written by hand and the truncation
rule spelled out per record; FLOPs counted by hand from the layer shapes and measured by torch's
own FLOP counter (torch.utils.flop_counter) on a real Megatron-Core GPTModel forward + backward.
"""

import json
import os

import pytest

from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.testing.multiproc import run_distributed
from megatron_ddk.training.flops import FlopCounter, forward_flops_per_token
from megatron_ddk.training.metrics import RunLogger


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def first_run(run_dir, steps=6, interval=3, end=True):
    """What a run of `steps` steps with DDK interval `interval` writes (as the Trainer does)."""
    log = RunLogger(run_dir, enabled=True, tensorboard=False)
    for s in range(steps + 1):
        if s:
            log.record("step", {"step": s, "loss": float(s)})
        if s % interval == 0 and s < steps:  # the next interval starts after step s
            log.record("interval", {"step": s, "weights": [s]})
    if end:
        log.record("end", {"step": steps, "reason": "budget"})
    log.close()


def test_resume_keeps_steps_up_to_and_intervals_before_the_resume_step(tmp_path):
    run = str(tmp_path)
    first_run(run, steps=6, interval=3)
    path = os.path.join(run, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"kind": "step", "step": 7, "lo')  # a line cut by a kill
    RunLogger(run, enabled=True, tensorboard=False, resume_step=3).close()
    kept = [(r["kind"], r["step"]) for r in read(path)]
    # interval 3 was written after the step-3 checkpoint and is decided again by the resumed run
    assert kept == [("interval", 0), ("step", 1), ("step", 2), ("step", 3)]
    assert os.listdir(run) == ["metrics.jsonl"]  # no temporary file, nothing moved aside


def test_resume_at_the_end_drops_the_end_record(tmp_path):
    run = str(tmp_path)
    first_run(run, steps=6, interval=3)
    RunLogger(run, enabled=True, tensorboard=False, resume_step=6).close()
    kinds = [(r["kind"], r["step"]) for r in read(os.path.join(run, "metrics.jsonl"))]
    assert kinds == [("interval", 0), ("step", 1), ("step", 2), ("step", 3), ("interval", 3),
                     ("step", 4), ("step", 5), ("step", 6)]


def test_fresh_run_starts_a_new_file_and_keeps_the_old_one(tmp_path):
    run = str(tmp_path)
    # a run killed before its first checkpoint: interval 0 and two steps, no end record
    first_run(run, steps=2, interval=10, end=False)
    os.makedirs(os.path.join(run, "tensorboard"))
    old = read(os.path.join(run, "metrics.jsonl"))
    log = RunLogger(run, enabled=True, tensorboard=False, resume_step=0)  # restart, no ckpt
    log.record("interval", {"step": 0, "weights": [0]})
    log.close()
    new = read(os.path.join(run, "metrics.jsonl"))
    assert [(r["kind"], r["step"]) for r in new] == [("interval", 0)]  # one interval-0 record
    aside = sorted(n for n in os.listdir(run) if n.startswith("metrics.") and n != "metrics.jsonl")
    assert len(aside) == 1 and aside[0].endswith(".jsonl")
    assert read(os.path.join(run, aside[0])) == old
    stamp = aside[0][len("metrics."):-len(".jsonl")]
    assert os.path.isdir(os.path.join(run, f"tensorboard.{stamp}"))
    assert not os.path.exists(os.path.join(run, "tensorboard"))
    # two more fresh runs within the same second: every earlier file is kept under its own name
    first_run(run, steps=1, interval=1)
    RunLogger(run, enabled=True, tensorboard=False).close()
    assert len([n for n in os.listdir(run) if n.startswith("metrics.")]) == 1 + 3
    assert os.path.getsize(os.path.join(run, "metrics.jsonl")) == 0


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(str(tmp_path / "run"), enabled=False, tensorboard=True)
    log.record("step", {"step": 1})
    log.write_metadata("a: 1\n", {})
    log.close()
    assert not os.path.exists(str(tmp_path / "run"))


# ------------------------------------------------------------------------------ FLOPs
MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=96, max_position_embeddings=64)
SEQ, VOCAB = 32, 512


def test_forward_flops_by_hand():
    # per layer: QKV 64 x (4 + 2*2) * 16 = 64 x 128, projection 64 x 64, SwiGLU fc1 64 x 192 and
    # fc2 96 x 64: 2 FLOPs per weight per token; attention QK^T and AV: 2 * 2 * s * d * heads
    qkv, proj, fc1, fc2 = 64 * 128, 64 * 64, 64 * 192, 96 * 64
    per_layer = 2 * (qkv + proj + fc1 + fc2) + 2 * 2 * SEQ * 16 * 4
    assert per_layer == 2 * 30720 + 8192 == 69632
    expected = 2 * per_layer + 2 * 64 * VOCAB
    assert forward_flops_per_token(MODEL, SEQ, VOCAB) == expected == 204800
    gelu = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, activation="gelu")
    # MHA, f = 4h = 128, GELU: QKV 32 x 96, proj 32 x 32, fc1 32 x 128, fc2 128 x 32
    assert forward_flops_per_token(gelu, 8, 100) == \
        2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 2 * 2 * 8 * 16 * 2 + 2 * 32 * 100


def test_flop_counter_per_step_and_mfu():
    teacher = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4)
    tokens = 8 * SEQ
    fc = FlopCounter(MODEL, teacher, SEQ, VOCAB, tokens)
    assert fc.student_per_step == 3 * 204800 * tokens
    # teacher: MHA 64 x 192 QKV, 64 x 64 proj, SwiGLU with f = 256: 64 x 512 and 256 x 64
    t_layer = 2 * (64 * 192 + 64 * 64 + 64 * 512 + 256 * 64) + 2 * 2 * SEQ * 16 * 4
    assert fc.teacher_per_step == (4 * t_layer + 2 * 64 * VOCAB) * tokens
    assert FlopCounter(MODEL, None, SEQ, VOCAB, tokens).teacher_per_step == 0.0
    fc.peak = 1e12  # a known peak: MFU = FLOPs / s / (peak x devices)
    total = fc.student_per_step + fc.teacher_per_step
    assert fc.mfu(steps=10, seconds=2.0, world_size=4) == pytest.approx(total * 10 / 2.0 / 4e12)
    assert fc.mfu(steps=10, seconds=0.0, world_size=4) is None
    fc.peak = None  # CPU / unknown GPU: no MFU
    assert fc.mfu(steps=10, seconds=2.0, world_size=1) is None


def _measure_flops(rank, world):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.parallel import initialize

    ctx = initialize(1, 1, seed=7)
    model = build_gpt_model(MODEL, ctx, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(tokens, positions, None)
    forward = counter.get_total_flops()
    with counter:
        logits = model(tokens, positions, None)
        logits.float().sum().backward()
    return forward, counter.get_total_flops(), 2 * SEQ


def test_flop_counter_matches_torch_flop_counter_on_megatron_gpt():
    forward, train, tokens = run_distributed(_measure_flops, 1, timeout=240)[0]
    assert forward == forward_flops_per_token(MODEL, SEQ, VOCAB) * tokens
    fc = FlopCounter(MODEL, None, SEQ, VOCAB, tokens)
    assert train == fc.student_per_step
