"""tools/plan_memory.py and megatron_ddk/models/memory.py against hand computations.

References are written out here independently of the module: parameter counts of released
models from their dimensions (and their published sizes), Korthikanti et al.'s activation
formula, and a component-by-component byte count of one preset's layout.
"""

import os

import pytest

from megatron_ddk.cli import run_tool
from megatron_ddk.config import load_config
from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.models.memory import (
    GIB,
    Layout,
    layer_activation_bytes,
    model_params,
    plan_stages,
    stage_layers,
    student_activation_bytes,
)
from megatron_ddk.testing.multiproc import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = os.path.join(ROOT, "examples", "presets")
QWEN_14_TO_18 = os.path.join(PRESETS, "qwen1.5_14b_to_1.8b.yaml")


def test_qwen15_18b_parameter_count_by_hand():
    cfg = load_config(QWEN_14_TO_18)
    h, layers, ffn, vocab = 2048, 24, 5504, 151936
    qkv = h * 3 * h + 3 * h          # MHA: q, k, v of h each, with the Qwen qkv bias
    proj = h * h
    mlp = h * 2 * ffn + ffn * h      # SwiGLU: gate and up (h x 2f), down (f x h)
    norms = 2 * h                    # two RMSNorm weights
    per_layer = qkv + proj + mlp + norms
    expected = layers * per_layer + 2 * vocab * h + h   # untied embedding + output, final norm
    assert expected == 1_836_828_672
    assert model_params(cfg.model, vocab) == expected
    assert abs(expected / 1e9 - 1.84) < 0.005   # Qwen1.5-1.8B's published size


@pytest.mark.parametrize("preset, student_b, teacher_b", [
    ("qwen1.5_14b_to_1.8b.yaml", 1.84, 14.17),
    ("qwen1.5_14b_to_4b.yaml", 3.95, 14.17),
    ("qwen1.5_7b_to_1.8b.yaml", 1.84, 7.72),
    ("llama2_13b_to_tinyllama_1.1b.yaml", 1.10, 13.02),
    ("starcoder_15.5b_to_3b.yaml", 3.04, 15.52),
])
def test_preset_parameter_counts_match_published_sizes(preset, student_b, teacher_b):
    """Published sizes (HF model cards / safetensors totals), in billions, 2 decimals."""
    cfg = load_config(os.path.join(PRESETS, preset))
    s = model_params(cfg.model, cfg.model.padded_vocab_size) / 1e9
    t = model_params(cfg.distill.teacher, cfg.distill.teacher.padded_vocab_size) / 1e9
    assert abs(s - student_b) < 0.006 and abs(t - teacher_b) < 0.006, (s, t)


def _gelu_mha(dropout: float) -> ModelConfig:
    return ModelConfig(num_layers=4, hidden_size=1024, num_attention_heads=16, activation="gelu",
                       normalization="LayerNorm", hidden_dropout=dropout,
                       attention_dropout=dropout)


@pytest.mark.parametrize("tp, sp", [(1, False), (4, False), (4, True)])
def test_layer_activations_reduce_to_korthikanti(tp, sp):
    """GELU, f = 4h, MHA, dropout on, attention materialized: the paper's Table 2 formulas."""
    m, s, b, h, a = _gelu_mha(0.1), 512, 2, 1024, 16
    lay = Layout(tp=tp, pp=1, dp=1, micro_batch_size=b, seq_length=s, sequence_parallel=sp,
                 attention="materialized")
    if sp:
        expected = s * b * h * (34 + 5 * a * s / h) / tp
    else:
        expected = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    assert layer_activation_bytes(m, lay) == pytest.approx(expected, rel=0, abs=1)
    # selective recompute drops exactly the attention-core term 5as^2b / t
    sel = layer_activation_bytes(m, lay, selective=True)
    assert sel == pytest.approx(expected - 5 * a * s * s * b / tp, abs=1)


def test_full_recompute_and_pipeline_in_flight():
    m, s, b, h = _gelu_mha(0.0), 256, 1, 1024
    lay = Layout(tp=1, pp=4, dp=1, micro_batch_size=b, seq_length=s, num_microbatches=8,
                 attention="materialized", recompute="full")
    per_layer = layer_activation_bytes(m, lay)
    # no dropout: 8sbh (norm, QKV, fc1 inputs) + 8sbh (q, k, v, proj input) + 16sbh (4h MLP)
    # + 4as^2b (scores and softmax, no dropout mask)
    assert per_layer == 32 * s * b * h + 4 * 16 * s * s * b
    # full recompute, 1 layer per chunk: the input 2sbh of every layer per in-flight micro-batch,
    # plus one layer recomputed in backward; 1F1B stage 0 of 4 holds 4 micro-batches
    assert stage_layers(m, 4) == [1, 1, 1, 1]
    assert student_activation_bytes(m, lay, 1, 4) == 4 * 2 * s * b * h + per_layer
    lay.recompute = None
    assert student_activation_bytes(m, lay, 1, 4) == 4 * per_layer
    stages = plan_stages(m, None, 32000, lay)
    assert [st.in_flight for st in stages] == [4, 3, 2, 1]


def test_tied_output_layer_copy_on_last_stage():
    m = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                    share_embeddings_and_output_weights=True)
    lay = Layout(tp=1, pp=2, dp=1, micro_batch_size=1, seq_length=16)
    st = plan_stages(m, None, 1024, lay)
    # RMSNorm, SwiGLU with f = 4h = 256, MHA: qkv 3h^2, proj h^2, fc1 h x 2f, fc2 f x h, 2 norms
    per_layer = 64 * 3 * 64 + 64 * 64 + 64 * 2 * 256 + 256 * 64 + 2 * 64
    first = 2 * per_layer + 1024 * 64
    last = 2 * per_layer + 64 + 1024 * 64          # final norm + the output layer's own copy
    assert st[0].student["weights"] == 2 * first
    assert st[1].student["weights"] == 2 * last
    assert model_params(m, 1024) == 4 * per_layer + 1024 * 64 + 64   # counted once


def test_qwen_14b_to_18b_preset_bytes_by_hand():
    """Every component of the preset's layout (TP=2, PP=1, DP=16, 2 x 4096, SP, flash)."""
    cfg = load_config(QWEN_14_TO_18)
    tp, dp, s, b, v = 2, 16, 4096, 2, 152064      # common padded vocabulary: the 14B's rows

    def params_per_rank(h, layers, heads, ffn):
        gemm = layers * (h * 3 * h + h * h + h * 2 * ffn + ffn * h) // tp + 2 * (v // tp) * h
        other = layers * (2 * h + 3 * h // tp) + h     # norms replicated, qkv bias split
        return gemm + other

    def layer_act(h, heads, ffn):
        replicated = 8 * s * b * h // tp              # divided by TP under sequence parallel
        split = (4 * s * b * h + 4 * s * b * h + 6 * s * b * ffn + 4 * heads * s * b) // tp
        return replicated + split

    n_s = params_per_rank(2048, 24, 16, 5504)
    n_t = params_per_rank(5120, 40, 40, 13696)
    logits = 2 * s * b * (v // tp)                 # bf16: the loss receives bf16 logits
    student = {
        "weights": 2 * n_s, "grads": 4 * n_s, "optimizer": 12 * n_s // dp,
        "activations": 24 * layer_act(2048, 16, 5504) + 2 * 2 * s * b * 2048 // tp,
        "logits": logits, "logits_grad": logits,   # the loss's backward writes a bf16 gradient
        "loss_workspace": 2 * 4 * 256 * (v // tp),  # two fp32 256-token chunks (KL)
    }
    teacher = {
        "weights": 2 * n_t,
        "activations": layer_act(5120, 40, 13696) + 2 * 2 * s * b * 5120 // tp,
        "logits": logits,
    }
    lay = Layout(tp=tp, pp=1, dp=dp, micro_batch_size=b, seq_length=s, num_microbatches=4,
                 sequence_parallel=True, attention="flash")
    (stage,) = plan_stages(cfg.model, cfg.distill.teacher, v, lay)
    assert stage.student == student
    assert stage.teacher == teacher
    total = sum(student.values()) + sum(teacher.values()) + 3 * GIB
    assert stage.total == total
    assert 30 * GIB < total < 40 * GIB   # ~33.5 GiB: fits 80 GB with room


# A tiny KD layout for the last-stage rows: TP=2, PP=2, 2 x 64 tokens, 1024 padded rows
# (512 per TP rank), 32-token loss chunks.
TINY_S, TINY_B, TINY_V, TINY_CHUNK = 64, 2, 1024, 32


def _tiny_layout(bf16: bool) -> Layout:
    return Layout(tp=2, pp=2, dp=1, micro_batch_size=TINY_B, seq_length=TINY_S, bf16=bf16,
                  kl_chunk_tokens=TINY_CHUNK)


def test_bf16_last_stage_by_hand():
    """train.bf16: the loss receives bf16 logits (training/builder.float16_wrap) and writes a
    bf16 gradient; its fp32 chunk buffers stay fp32."""
    student = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    teacher = ModelConfig(num_layers=4, hidden_size=96, num_attention_heads=4)
    first, last = plan_stages(student, teacher, TINY_V, _tiny_layout(bf16=True))
    # 64 x 2 tokens x 512 columns = 65,536 logits per rank, 2 bytes each
    assert last.student["logits"] == last.teacher["logits"] == 131_072
    assert last.student["logits_grad"] == 131_072
    # backward: student and teacher softmax chunks, 32 tokens x 512 columns x 4 bytes each
    assert last.student["loss_workspace"] == 2 * 65_536 == 131_072
    for key in ("logits", "logits_grad", "loss_workspace"):
        assert key not in first.student and key not in first.teacher
    # CE alone (CPT): one fp32 chunk beside the bf16 gradient
    (_, cpt) = plan_stages(student, None, TINY_V, _tiny_layout(bf16=True))
    assert cpt.student["loss_workspace"] == 65_536 and cpt.teacher == {}
    # fp32 training: 4 bytes per logit; the gradient's own fp32 slice is the first buffer
    _, fp32 = plan_stages(student, teacher, TINY_V, _tiny_layout(bf16=False))
    assert fp32.student["logits"] == fp32.student["logits_grad"] == 262_144
    assert fp32.student["loss_workspace"] == 65_536
    _, fp32_cpt = plan_stages(student, None, TINY_V, _tiny_layout(bf16=False))
    assert fp32_cpt.student["loss_workspace"] == 0


def _loss_allocations(rank, world):
    """Every new tensor with a vocabulary-wide last dim that the real loss creates in its
    forward and in its backward, as (dtype, shape), for bf16 and fp32 logits, KD and CE."""
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from megatron_ddk.losses.kl import vocab_parallel_ce_and_kl, vocab_parallel_cross_entropy

    columns = TINY_V // 2  # one TP rank's shard

    class Allocations(TorchDispatchMode):
        def __init__(self, seen):
            super().__init__()
            self.seen, self.new, self.keep = seen, [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.keep.append(t)  # alive until the end: no storage address is reused
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in self.seen:
                        self.seen.add(ptr)
                        if t.dim() >= 2 and t.shape[-1] == columns:
                            self.new.append((str(t.dtype), tuple(t.shape)))
            return out

    dist.init_process_group("gloo")
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for kd in (True, False):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(TINY_S, TINY_B, columns, generator=gen).to(dtype).requires_grad_()
            y = torch.randn(TINY_S, TINY_B, columns, generator=gen).to(dtype)
            labels = torch.randint(0, columns, (TINY_S, TINY_B), generator=gen)
            seen = {t.untyped_storage().data_ptr() for t in (x, y, labels)}
            kw = dict(tp_group=dist.group.WORLD, chunk_tokens=TINY_CHUNK)
            with Allocations(seen) as fwd:
                if kd:
                    loss = sum(t.sum() for t in vocab_parallel_ce_and_kl(x, y, labels, **kw))
                else:
                    loss = vocab_parallel_cross_entropy(x, labels, **kw).sum()
            with Allocations(seen) as bwd:  # autograd.grad: no copy into a leaf's .grad
                (grad,) = torch.autograd.grad(loss, x)
            out[(str(dtype), kd)] = {"forward": fwd.new, "backward": bwd.new,
                                     "grad": (str(grad.dtype), grad.nbytes)}
    dist.destroy_process_group()
    return out


def test_loss_copies_match_the_plan():
    """The real loss (losses/kl.py) on one TP rank's [s, b, v/tp] shard: what it allocates is the
    plan's last-stage rows, nothing else vocabulary-sized (no fp32 copy of bf16 logits)."""
    measured = run_distributed(_loss_allocations, 1, timeout=240)[0]
    student = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    tokens, chunk = (TINY_S * TINY_B, TINY_V // 2), (TINY_CHUNK, TINY_V // 2)
    for (dtype, kd), got in measured.items():
        bf16 = dtype == "torch.bfloat16"
        _, last = plan_stages(student, student if kd else None, TINY_V, _tiny_layout(bf16))
        # the logits gradient, in the logits' dtype, is the only tokens x v/tp tensor created
        assert got["grad"] == (dtype, last.student["logits_grad"])
        assert got["backward"].count((dtype, tokens)) == 1
        buffers = [a for a in got["backward"] if a != (dtype, tokens)]
        assert buffers == [("torch.float32", chunk)] * len(buffers)
        assert len(buffers) * 4 * TINY_CHUNK * TINY_V // 2 == last.student["loss_workspace"]
        # the forward's fp32 chunks (two with KL, one for CE) never exceed the gradient
        assert got["forward"] == [("torch.float32", chunk)] * (2 if kd else 1)


def test_plan_memory_cli(capsys):
    assert run_tool("plan-memory", ["--config", QWEN_14_TO_18]) == 0
    out = capsys.readouterr().out
    assert "TP=2 x PP=1 x DP=16 = 32 GPUs" in out and "fits in 80 GiB" in out
    assert "teacher 14.167 B parameters" in out
    assert run_tool("plan-memory", ["--config", QWEN_14_TO_18, "--tp", "1", "--recompute", "none",
                      "--attention", "materialized", "--micro-batch-size", "4"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    # 32 GPUs / (3 x 1)
    assert run_tool("plan-memory", ["--config", QWEN_14_TO_18, "--tp", "3"]) == 2
