"""Per-GPU memory plan of a distillation run: will this preset's layout fit the GPUs?

    megatron-ddk plan-memory --config examples/presets/qwen1.5_14b_to_1.8b.yaml
    megatron-ddk plan-memory --config examples/presets/qwen1.5_14b_to_1.8b.yaml \
        --tp 8 --pp 1 --dp 4 --micro-batch-size 2 --recompute full

Prints, for every pipeline stage (first and last only when PP > 4), a table of the student's and
the teacher's bytes per GPU (weights, main grads, distributed-optimizer shards, activations,
logits) and the total, and flags stages above --gpu-memory-gb. All figures are GiB (2^30 bytes).
The formulas are in megatron_ddk/models/memory.py and docs/launch.md ("Reading plan_memory").

The layout comes from the config's parallel section; DP from --dp, else --world-size / (TP x PP),
else the preset's "# world_size: N" header comment, else 1. The vocabulary comes from --manifest
(a domain manifest: its tokenizer's size), else the config's data.manifest when that file
exists, else --vocab-size, else the model section (vocab_size / padded_vocab_size). Exit status:
0 when every stage fits, 1 when one does not, 2 on a config error.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import List, Optional, Tuple

from megatron_ddk.config.loader import ConfigError, load_config
from megatron_ddk.config.schema import RunConfig
from megatron_ddk.console import messages, results
from megatron_ddk.models.memory import (
    GIB,
    Layout,
    StageMemory,
    model_params,
    plan_stages,
    planning_padded_vocab,
)

WORLD_SIZE_COMMENT = re.compile(r"^#\s*world_size:\s*(\d+)", re.MULTILINE)
"""Header comment of the presets that states the GPU count the layout was planned for."""

ROWS = [("weights", "weights (bf16; teacher +fp8 copy)"), ("grads", "main grads (fp32)"),
        ("optimizer", "optimizer: fp32 master + Adam m, v / DP"),
        ("activations", "activations (stored / working set)"),
        ("logits", "logits (bf16; fp32 without train.bf16)"),
        ("logits_grad", "gradient of the student logits (same)"),
        ("loss_workspace", "loss fp32 chunk buffers (CE / KL)")]


def declared_world_size(path: str) -> Optional[int]:
    """The N of a '# world_size: N' comment in the config file, or None."""
    with open(path, encoding="utf-8") as f:
        match = WORLD_SIZE_COMMENT.search(f.read())
    return int(match.group(1)) if match else None


def build_layout(cfg: RunConfig, args, world_size: Optional[int]) -> Layout:
    """The Layout to plan: the config's parallel/train sections, command-line flags on top."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    tp = args.tp or p.tensor_model_parallel_size
    pp = args.pp or p.pipeline_model_parallel_size
    if args.dp:
        dp = args.dp
    elif world_size:
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {tp * pp}")
        dp = world_size // (tp * pp)
    else:
        dp = 1
    mbs = args.micro_batch_size or t.micro_batch_size
    recompute = m.recompute_granularity if args.recompute is None else (
        None if args.recompute == "none" else args.recompute)
    attention = args.attention or ("flash" if m.transformer_impl == "transformer_engine"
                                   else "materialized")
    sp = p.sequence_parallel if args.sequence_parallel is None else args.sequence_parallel == "on"
    return Layout(
        tp=tp, pp=pp, dp=dp, micro_batch_size=mbs,
        seq_length=args.seq_length or cfg.data.seq_length,
        num_microbatches=max(1, t.global_batch_size // (mbs * dp)), sequence_parallel=sp and tp > 1,
        use_distributed_optimizer=p.use_distributed_optimizer,
        bf16=True if t.bf16 is None else t.bf16, attention=attention, recompute=recompute,
        recompute_method=m.recompute_method, recompute_num_layers=m.recompute_num_layers,
        kl_chunk_tokens=cfg.distill.kl_chunk_tokens, overhead_bytes=int(args.overhead_gb * GIB))


def plan_vocabulary(cfg: RunConfig, manifest: Optional[str],
                    vocab_size: Optional[int]) -> Tuple[Optional[int], str]:
    """(tokenizer vocabulary or None, where it came from): --manifest, else the config's
    data.manifest when it exists, else --vocab-size, else None (the model section decides)."""
    path = manifest or (cfg.data.manifest if cfg.data.manifest and
                        os.path.isfile(cfg.data.manifest) else None)
    if path is None:
        if vocab_size is not None:
            return vocab_size, "--vocab-size"
        return None, "the model section (no manifest found)"
    if vocab_size is not None:
        raise ConfigError(f"--vocab-size {vocab_size} and the manifest {path} both give the "
                          "vocabulary; pass one")
    from megatron_ddk.data.manifest import load_manifest

    vocab = load_manifest(path).vocab_size
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the manifest {path} has a "
                          f"{vocab}-entry tokenizer; remove model.vocab_size or fix the manifest")
    return vocab, f"manifest {path}"


def _gib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def stage_table(mem: StageMemory, num_stages: int, limit_gib: float) -> List[str]:
    """The text table of one stage."""
    title = (f"stage {mem.stage} of {num_stages}: student {mem.student_layers} layers, teacher "
             f"{mem.teacher_layers} layers, {mem.in_flight} micro-batch(es) in flight")
    lines = [title, f"  {'component':<42}{'student':>10}{'teacher':>10}{'total':>10}"]
    for key, label in ROWS:
        s, t = mem.student.get(key), mem.teacher.get(key)
        if s is None and t is None:
            continue
        lines.append(f"  {label:<42}{_gib(s):>10}{_gib(t):>10}{_gib((s or 0) + (t or 0)):>10}")
    lines.append(f"  {'overhead allowance (CUDA ctx, NCCL, frag.)':<42}{'':>10}{'':>10}"
                 f"{_gib(mem.overhead):>10}")
    s_sum, t_sum = sum(mem.student.values()), sum(mem.teacher.values())
    verdict = "fits" if mem.total / GIB <= limit_gib else "DOES NOT FIT"
    lines.append(f"  {'total per GPU':<42}{_gib(s_sum):>10}{_gib(t_sum or None):>10}"
                 f"{_gib(mem.total):>10}   {verdict} in {limit_gib:g} GiB")
    return lines


def report(cfg: RunConfig, lay: Layout, padded_vocab: int, stages: List[StageMemory],
           limit_gib: float, vocab: Tuple[Optional[int], str] = (None, "")) -> List[str]:
    """The whole printed report."""
    teacher = cfg.distill.teacher
    s_params = model_params(cfg.model, padded_vocab)
    head = [f"layout: TP={lay.tp} x PP={lay.pp} x DP={lay.dp} = {lay.tp * lay.pp * lay.dp} GPUs; "
            f"micro-batch {lay.micro_batch_size} x {lay.seq_length} tokens, "
            f"{lay.num_microbatches} micro-batches per step per DP rank",
            f"sequence parallel {'on' if lay.sequence_parallel else 'off'}, attention "
            f"{lay.attention}, student recompute {lay.recompute or 'none'}"
            + (f" ({lay.recompute_method}, {lay.recompute_num_layers})" if lay.recompute == "full"
               else "") + f", padded vocabulary {padded_vocab:,}",
            _vocab_line(vocab, padded_vocab),
            f"student {s_params / 1e9:.3f} B parameters"
            + (f", teacher {model_params(teacher, padded_vocab) / 1e9:.3f} B parameters"
               + (f" (fp8 {teacher.fp8})" if teacher.fp8 else "") if teacher else ", no teacher"),
            ""]
    shown = stages if len(stages) <= 4 else [stages[0], stages[-1]]
    for mem in shown:
        head += stage_table(mem, len(stages), limit_gib) + [""]
    worst = max(stages, key=lambda x: x.total)
    head.append(f"peak: stage {worst.stage}, {worst.total / GIB:.2f} GiB of {limit_gib:g} GiB "
                f"-> {'fits' if worst.total / GIB <= limit_gib else 'DOES NOT FIT'}")
    return head


def _vocab_line(vocab: Tuple[Optional[int], str], padded: int) -> str:
    size, source = vocab
    if size is None:
        return f"vocabulary from {source}"
    note = (f"; padded_vocab_size pins {padded:,} rows, {padded / size:.1f}x the tokenizer"
            if padded >= 2 * size else "")
    return f"vocabulary {size:,} entries from {source}{note}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run YAML (a preset)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: config)")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: config)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size")
    p.add_argument("--world-size", type=int, default=None, help="GPUs in total (gives DP)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: config")
    p.add_argument("--seq-length", type=int, default=None, help="default: config")
    p.add_argument("--recompute", choices=["none", "full", "selective"], default=None,
                   help="student activation recompute (default: model.recompute_granularity)")
    p.add_argument("--attention", choices=["flash", "materialized"], default=None,
                   help="default: flash with transformer_engine, materialized with local")
    p.add_argument("--sequence-parallel", choices=["on", "off"], default=None,
                   help="default: parallel.sequence_parallel")
    p.add_argument("--manifest", default=None,
                   help="domain manifest whose tokenizer size is the vocabulary (default: the "
                   "config's data.manifest when that file exists)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer size, without a manifest")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory, GiB")
    p.add_argument("--overhead-gb", type=float, default=3.0,
                   help="allowance for CUDA context, NCCL buffers, fragmentation (GiB)")
    p.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        world = args.world_size or declared_world_size(args.config)
        lay = build_layout(cfg, args, world)
        vocab = plan_vocabulary(cfg, args.manifest, args.vocab_size)
        padded = planning_padded_vocab(cfg.model, cfg.distill.teacher, lay.tp, vocab[0])
        stages = plan_stages(cfg.model, cfg.distill.teacher, padded, lay)
    except ValueError as exc:
        messages().info(f"error: {exc}")
        return 2
    results().info(f"{args.config}")
    results().info("\n".join(report(cfg, lay, padded, stages, args.gpu_memory_gb, vocab)))
    return 0 if all(s.total / GIB <= args.gpu_memory_gb for s in stages) else 1

