"""Per-GPU memory of a distillation run: pure arithmetic on ModelConfig and a parallel layout.

Used by `megatron-ddk plan-memory` to check, before a cluster job is queued, that a preset's
TP x PP x DP layout fits the GPUs. Everything here is a closed formula; nothing is measured.
Sizes in bytes.

Parameters (per model, per pipeline stage, per tensor-parallel rank) follow Megatron-Core's
GPTModel: word embedding [V_pad/tp, h] on the first stage; learned absolute position embedding
[max_pos, h] (replicated over TP) on the first stage; per layer the input norm, QKV
(h x (a + 2g) d, bias with add_qkv_bias or add_bias_linear, split over TP), the output projection
(a d x h, split; its bias replicated), the pre-MLP norm, fc1 (h x f, x2 for SwiGLU, split, bias
split) and fc2 (f x h, split, bias replicated); the final norm and the output layer [V_pad/tp, h]
on the last stage. A tied output layer is not counted again in the model total, but with PP > 1
the last stage holds its own copy (Megatron-Core keeps one and all-reduces its gradient).
Norms are weight only for RMSNorm, weight + bias for LayerNorm.

Student bytes per parameter (Megatron-Core DDP with grad_reduce_in_fp32 + distributed optimizer):
    bf16 weights 2 + fp32 main grads 4 + (fp32 master 4 + Adam m 4 + Adam v 4) / DP
(= Megatron-LM's 6 + 12/DP; 18 without the distributed optimizer). With fp32 training the weights
are the master copy: 4 + 4 + 8 / DP.

Activations per transformer layer and micro-batch, 16-bit, after Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1), generalised to
GQA (g query groups, head dim d), SwiGLU and dropout-free layers:
    replicated over TP (divided by TP only with sequence parallelism):
        2sbh x 4  (inputs of the two norms, of the QKV GEMM, of fc1)
        + sbh x 2 (hidden-dropout masks, only when hidden_dropout > 0)
    split over TP:
        2sb(a d) (Q) + 4sb(g d) (K, V) + 2sb(a d) (input of the output projection)
        + MLP: GELU 4sbf (fc1 output, activation output); SwiGLU 6sbf (fc1 output 2f, output f)
        + attention core: materialized (local spec) 5 a s^2 b (scores 2, softmax 2, dropout mask 1;
          4 a s^2 b when attention_dropout == 0); flash (Transformer Engine) 4 a s b (fp32 LSE)
With GELU, f = 4h, MHA, both dropouts on and materialized attention this is exactly the paper's
    sbh (34 + 5 a s / h)            without TP,   and   sbh (10 + 24/t + 5 a s / (h t)) with TP t,
and sbh (34 + 5 a s / h) / t with sequence parallelism.
Recompute: full (uniform) keeps only each chunk's input 2sbh (/t with SP) and, in backward, one
chunk's full activations; full (block) keeps inputs for recompute_num_layers layers per stage and
full activations for the rest; selective drops the attention-core term.
Pipeline (1F1B): stage i holds min(PP - i, micro-batches per step) micro-batches in flight.

Teacher: bf16 weights (2 bytes; with teacher fp8, +1 byte per GEMM weight for Transformer Engine's
cached FP8 copy), no grads, no optimizer; forward under no_grad, so its activations are the working
set of one layer (the per-layer formula) rather than a stored stack.

Last stage, at the peak (the loss's backward): the student's and the teacher's logits
[s, b, V_pad/tp] in the training dtype, 2 bytes each with bf16 (training/builder.float16_wrap keeps
Float16Module's outputs bf16, so the loss receives bf16 logits and no fp32 copy of them exists),
4 with fp32; the gradient of the student logits, which the loss's backward writes in the logits'
dtype (losses/kl.py: empty_like); the fp32 working chunks of kl_chunk_tokens x V_pad/tp the
loss's backward holds beside that gradient: with a teacher two in bf16 (student and teacher
softmax), one in fp32 (the gradient's own fp32 slice is the first); for CE alone (CPT) one in
bf16, none in fp32 (the forward's chunks, two or one, are freed before and are never more than
the gradient); and the final-norm / output-layer inputs.

Must not import torch, megatron.core or anything of megatron_ddk beyond config and models.vocab.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_ddk.config.pipeline_split import pipeline_stage_layers
from megatron_ddk.config.schema import KL_CHUNK_TOKENS, ModelConfig
from megatron_ddk.models.vocab import model_padded_size

logger = logging.getLogger(__name__)

GIB = 1024 ** 3
"""Bytes per GiB; every figure the planner prints is in GiB."""


@dataclass
class Layout:
    """A parallel layout and batch shape to plan for."""

    tp: int
    """Tensor-parallel size."""

    pp: int
    """Pipeline-parallel size."""

    dp: int
    """Data-parallel size (the distributed optimizer shards over it)."""

    micro_batch_size: int
    """Samples per micro-batch."""

    seq_length: int
    """Tokens per sample."""

    num_microbatches: int = 1
    """Micro-batches per optimizer step per DP rank (bounds the pipeline's in-flight count)."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (splits the replicated activations over TP)."""

    use_distributed_optimizer: bool = True
    """Shard fp32 master weights and Adam moments over DP."""

    bf16: bool = True
    """bf16 weights with fp32 master copies; False means plain fp32 training."""

    attention: str = "flash"
    """Attention core: 'flash' (Transformer Engine fused attention) or 'materialized' (local)."""

    recompute: Optional[str] = None
    """None, 'full' or 'selective' (the student's recompute_granularity)."""

    recompute_method: str = "uniform"
    """With full recompute: 'uniform' or 'block'."""

    recompute_num_layers: int = 1
    """Layers per recompute chunk (uniform) or recomputed layers per stage (block)."""

    kl_chunk_tokens: int = KL_CHUNK_TOKENS
    """Tokens per fp32 chunk buffer of the loss (distill.kl_chunk_tokens)."""

    overhead_bytes: int = 3 * GIB
    """Allowance for the CUDA context, NCCL buffers and allocator fragmentation."""


@dataclass
class StageMemory:
    """Bytes per GPU on one pipeline stage, by component and model."""

    stage: int
    """Pipeline stage index."""

    in_flight: int
    """Micro-batches whose student activations this stage holds at the peak (1F1B)."""

    student_layers: int
    """Student transformer layers on this stage."""

    teacher_layers: int
    """Teacher transformer layers on this stage (0 without a teacher)."""

    student: Dict[str, int] = field(default_factory=dict)
    """Component name -> bytes for the student."""

    teacher: Dict[str, int] = field(default_factory=dict)
    """Component name -> bytes for the teacher."""

    overhead: int = 0
    """Fixed allowance (CUDA context, NCCL, fragmentation)."""

    @property
    def total(self) -> int:
        """All bytes on this GPU."""
        return sum(self.student.values()) + sum(self.teacher.values()) + self.overhead


def _dims(m: ModelConfig):
    """(h, a, g, d, f) with Megatron's defaults filled in."""
    h, a = m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or a
    d = m.kv_channels or h // a
    f = m.ffn_hidden_size or 4 * h
    return h, a, g, d, f


def layer_params(m: ModelConfig, tp: int = 1) -> Dict[str, int]:
    """Parameters of one transformer layer on one TP rank, by kind ('gemm' weights vs 'other')."""
    h, a, g, d, f = _dims(m)
    norm = 2 * h if m.normalization == "LayerNorm" else h
    fc1_out = 2 * f if m.activation == "swiglu" else f
    qkv_out = (a + 2 * g) * d
    gemm = (h * qkv_out + a * d * h + h * fc1_out + f * h) // tp
    other = 2 * norm
    if m.add_qkv_bias or m.add_bias_linear:
        other += qkv_out // tp
    if m.add_bias_linear:
        other += fc1_out // tp + 2 * h  # fc1 bias split; proj and fc2 biases replicated
    return {"gemm": gemm, "other": other}


def stage_layers(m: ModelConfig, pp: int) -> List[int]:
    """Transformer layers on each pipeline stage (config/pipeline_split.py's rule, the one the
    config checks and the pair use); ValueError when the split cannot work."""
    split = pipeline_stage_layers(m.num_layers, pp, m.num_layers_in_first_pipeline_stage,
                                  m.num_layers_in_last_pipeline_stage)
    if split is None:
        raise ValueError(f"num_layers={m.num_layers} cannot be split over {pp} pipeline stages "
                         f"(first: {m.num_layers_in_first_pipeline_stage}, last: "
                         f"{m.num_layers_in_last_pipeline_stage}); every stage needs at least "
                         f"one layer")
    return split


def stage_params(m: ModelConfig, padded_vocab: int, tp: int, pp: int, stage: int) -> Dict[str, int]:
    """Parameters held by one GPU of `stage`, split into 'gemm' and 'other' (embeddings in
    other)."""
    h = m.hidden_size
    per_layer = layer_params(m, tp)
    n = stage_layers(m, pp)[stage]
    gemm, other = n * per_layer["gemm"], n * per_layer["other"]
    if stage == 0:
        other += padded_vocab // tp * h
        if m.position_embedding_type == "learned_absolute":
            other += m.max_position_embeddings * h
    if stage == pp - 1:
        other += 2 * h if m.normalization == "LayerNorm" else h
        if not m.share_embeddings_and_output_weights or pp > 1:
            gemm += padded_vocab // tp * h
    return {"gemm": gemm, "other": other}


def model_params(m: ModelConfig, padded_vocab: int) -> int:
    """Unique parameters of the whole model (a tied output layer counted once)."""
    h = m.hidden_size
    total = m.num_layers * sum(layer_params(m, 1).values())
    total += padded_vocab * h * (1 if m.share_embeddings_and_output_weights else 2)
    if m.position_embedding_type == "learned_absolute":
        total += m.max_position_embeddings * h
    return total + (2 * h if m.normalization == "LayerNorm" else h)


def layer_activation_bytes(m: ModelConfig, lay: Layout, selective: bool = False) -> int:
    """Bytes one transformer layer keeps for backward for one micro-batch (formula above)."""
    h, a, g, d, f = _dims(m)
    s, b, t = lay.seq_length, lay.micro_batch_size, lay.tp
    replicated = 8 * s * b * h + (2 * s * b * h if m.hidden_dropout > 0 else 0)
    mlp = (6 if m.activation == "swiglu" else 4) * s * b * f
    split = 4 * s * b * a * d + 4 * s * b * g * d + mlp
    if lay.attention == "materialized":
        core = (5 if m.attention_dropout > 0 else 4) * a * s * s * b
    else:
        core = 4 * a * s * b
    if not selective:
        split += core
    return (replicated // t if lay.sequence_parallel else replicated) + split // t


def _hidden_bytes(m: ModelConfig, lay: Layout) -> int:
    """One [s, b, h] 16-bit tensor on this rank (divided by TP under sequence parallelism)."""
    full = 2 * lay.seq_length * lay.micro_batch_size * m.hidden_size
    return full // lay.tp if lay.sequence_parallel else full


def student_activation_bytes(m: ModelConfig, lay: Layout, num_layers: int, in_flight: int) -> int:
    """Stored transformer-layer activations of the student on one stage at the 1F1B peak."""
    if num_layers == 0:
        return 0
    if lay.recompute == "full":
        full, kept = layer_activation_bytes(m, lay), _hidden_bytes(m, lay)
        if lay.recompute_method == "block":
            recomputed = min(lay.recompute_num_layers, num_layers)
            stored = recomputed * kept + (num_layers - recomputed) * full
            return in_flight * stored + (full if recomputed else 0)
        chunk = max(1, min(lay.recompute_num_layers, num_layers))
        num_chunks = -(-num_layers // chunk)
        return in_flight * num_chunks * kept + chunk * full
    per_layer = layer_activation_bytes(m, lay, selective=lay.recompute == "selective")
    return in_flight * num_layers * per_layer


def _weight_bytes(params: Dict[str, int], lay: Layout, fp8: bool = False) -> int:
    per = 2 if lay.bf16 else 4
    return per * (params["gemm"] + params["other"]) + (params["gemm"] if fp8 else 0)


def _student_states(params: Dict[str, int], lay: Layout) -> Dict[str, int]:
    n = params["gemm"] + params["other"]
    shard = lay.dp if lay.use_distributed_optimizer else 1
    optimizer = (12 if lay.bf16 else 8) * n // shard
    return {"weights": _weight_bytes(params, lay), "grads": 4 * n, "optimizer": optimizer}


def logits_bytes(lay: Layout, padded_vocab: int) -> int:
    """One [s, b, V_pad/tp] logits tensor (or its gradient) in the training dtype."""
    return (2 if lay.bf16 else 4) * lay.seq_length * lay.micro_batch_size * (padded_vocab // lay.tp)


def loss_workspace_bytes(lay: Layout, padded_vocab: int, with_teacher: bool) -> int:
    """The fp32 chunk buffers the loss's backward holds beside the logits gradient (module
    docstring): KL 2 (bf16) or 1 (fp32), CE alone 1 (bf16) or 0 (fp32)."""
    chunk = min(lay.kl_chunk_tokens, lay.seq_length * lay.micro_batch_size)
    num_chunks = (2 if with_teacher else 1) - (0 if lay.bf16 else 1)
    return num_chunks * 4 * chunk * (padded_vocab // lay.tp)


def plan_stages(student: ModelConfig, teacher: Optional[ModelConfig], padded_vocab: int,
                lay: Layout) -> List[StageMemory]:
    """Memory of one GPU of every pipeline stage."""
    s_layers = stage_layers(student, lay.pp)
    t_layers = stage_layers(teacher, lay.pp) if teacher is not None else [0] * lay.pp
    stages = []
    for i in range(lay.pp):
        in_flight = max(1, min(lay.pp - i, lay.num_microbatches))
        mem = StageMemory(stage=i, in_flight=in_flight, student_layers=s_layers[i],
                          teacher_layers=t_layers[i], overhead=lay.overhead_bytes)
        mem.student = _student_states(stage_params(student, padded_vocab, lay.tp, lay.pp, i), lay)
        mem.student["activations"] = student_activation_bytes(student, lay, s_layers[i], in_flight)
        last = i == lay.pp - 1
        if last:
            mem.student["activations"] += 2 * _hidden_bytes(student, lay)  # head inputs
            mem.student["logits"] = logits_bytes(lay, padded_vocab)
            mem.student["logits_grad"] = logits_bytes(lay, padded_vocab)
            mem.student["loss_workspace"] = loss_workspace_bytes(lay, padded_vocab,
                                                                 teacher is not None)
        if teacher is not None:
            t_params = stage_params(teacher, padded_vocab, lay.tp, lay.pp, i)
            mem.teacher["weights"] = _weight_bytes(t_params, lay, fp8=teacher.fp8 is not None)
            working = layer_activation_bytes(teacher, lay) if t_layers[i] else 0
            mem.teacher["activations"] = working
            if last:
                mem.teacher["activations"] += 2 * _hidden_bytes(teacher, lay)
                mem.teacher["logits"] = logits_bytes(lay, padded_vocab)
        stages.append(mem)
    return stages


def planning_padded_vocab(student: ModelConfig, teacher: Optional[ModelConfig], tp: int,
                          vocab_size: Optional[int] = None) -> int:
    """The common padded vocabulary both models are built with (models/vocab.py's rule).

    Explicit padded_vocab_size fields win; otherwise vocab_size (argument, else the model's) is
    padded. ValueError when neither is known.
    """
    sizes = []
    for where, m in (("model", student), ("distill.teacher", teacher)):
        if m is None:
            continue
        vocab = vocab_size or m.vocab_size or m.padded_vocab_size
        if vocab is None:
            raise ValueError(f"{where}: neither padded_vocab_size nor vocab_size is set; pass "
                             f"--vocab-size (the tokenizer's size) to plan memory")
        sizes.append(model_padded_size(m, vocab, tp))
    return max(sizes)
