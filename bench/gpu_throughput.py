"""Single-GPU throughput of CPT, KD (bf16 / FP8 teacher) and DDK, with MFU and FP8 logit error.

    python bench/gpu_throughput.py                      # one H100: seq 2048 and 4096
    python bench/gpu_throughput.py --seq-lengths 4096 --micro-batch-size 2
    python bench/gpu_throughput.py --cpu-smoke          # same code path, tiny fp32 shapes, on CPU

The pair is scaled to fit one GPU: a student with Qwen-1.5-1.8B-shaped layers (hidden 2048,
16 heads, ffn 5504) and a teacher with Qwen-1.5-7B-shaped layers (hidden 4096, 32 heads, ffn
11008), both at reduced depth (8 layers each by default), the Qwen-1.5 vocabulary (151,646
tokens, 151,936 embedding rows), bf16. Everything runs through the project's own pieces:
build_gpt_model on a world-1 ParallelContext, DistillationPair, Float16Module + Megatron-Core DDP
+ distributed optimizer (training/optimizer.py), training/schedule.forward_backward and
losses.distill.DistillationLoss, the way training/trainer.py composes a step.

Rows (per sequence length):
- CPT: the student alone (CE).
- KD, bf16 teacher: CE + gamma * KL with a frozen bf16 teacher forward in every micro-batch.
- KD, FP8 teacher: the same teacher weights with ModelConfig.fp8 set (Transformer Engine only).
- DDK: the KD step plus one per-domain evaluation pass (student forward over
  --eval-domains x --eval-samples samples, training/evaluate.evaluate_domains) every
  --interval steps, amortised: time/step = KD step + evaluation / K.
MFU counts the student's training FLOPs (3x forward) and the teacher's forward FLOPs
(training/flops.FlopCounter), plus the amortised evaluation forward for DDK, against the dense
bf16 peak (also for the FP8 rows). The FP8 column compares the FP8 teacher's logits with the bf16
teacher's on the same batch: relative L2 and mean KL(bf16 || FP8) per token, in fp32.
Without Transformer Engine the bf16 rows run with the local spec and the FP8 rows say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NO_GPU = ("bench/gpu_throughput.py measures tokens/s and MFU on one CUDA GPU, and this host has "
          "none (torch.cuda.is_available() is False). Run it on a GPU host (docs/fp8.md), or "
          "pass --cpu-smoke for a tiny fp32 run of the same code path.")
NO_TE = "n/a (Transformer Engine not installed)"
QWEN_VOCAB, QWEN_PADDED = 151646, 151936


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=4,
                   help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--student-layers", type=int, default=8, help="of the 1.8B shape's 24")
    p.add_argument("--teacher-layers", type=int, default=8, help="of the 7B shape's 32")
    p.add_argument("--impl", choices=["auto", "local", "transformer_engine"], default="auto",
                   help="layer implementation of the bf16 rows; auto = TE when it imports")
    p.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default="hybrid")
    p.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
                   default="delayed")
    p.add_argument("--fp8-amax-history-len", type=int, default=1024)
    p.add_argument("--interval", type=int, default=1000, help="DDK interval K in steps")
    p.add_argument("--eval-domains", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=8, help="validation samples per domain")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny fp32 shapes on CPU (no MFU): exercises the code path in tests")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- set-up
def model_configs(args):
    """(student, teacher, vocab_size) ModelConfigs of the benchmark (or of the smoke run)."""
    from megatron_ddk.config.schema import ModelConfig

    max_pos = max(args.seq_lengths)
    if args.cpu_smoke:
        common = dict(max_position_embeddings=max_pos, transformer_impl=args.impl)
        return (ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=64, **common),
                ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            ffn_hidden_size=128, **common), 500)
    common = dict(max_position_embeddings=max_pos, transformer_impl=args.impl,
                  norm_epsilon=1e-6, rotary_base=1000000, add_qkv_bias=True,
                  padded_vocab_size=QWEN_PADDED)
    student = ModelConfig(num_layers=args.student_layers, hidden_size=2048,
                          num_attention_heads=16, ffn_hidden_size=5504, **common)
    teacher = ModelConfig(num_layers=args.teacher_layers, hidden_size=4096,
                          num_attention_heads=32, ffn_hidden_size=11008, **common)
    return student, teacher, QWEN_VOCAB


def fp8_teacher_config(teacher, args):
    """The teacher's ModelConfig with FP8 switched on (Transformer Engine layers)."""
    return dataclasses.replace(teacher, transformer_impl="transformer_engine",
                               fp8=args.fp8_format, fp8_recipe=args.fp8_recipe,
                               fp8_amax_history_len=args.fp8_amax_history_len)


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter of `src` into the same-named parameter of `dst`."""
    dst_params = dict(dst.named_parameters())
    src_params = dict(src.named_parameters())
    if set(dst_params) != set(src_params):
        raise ValueError(f"copy_weights: parameter names differ: "
                         f"{sorted(set(dst_params) ^ set(src_params))[:6]}")
    with torch.no_grad():
        for name, p in src_params.items():
            dst_params[name].copy_(p)


class SyntheticDomain:
    """A domain's validation set of random tokens, in GPTDataset's sample format."""

    def __init__(self, domain: int, num_samples: int, seq_length: int, vocab_size: int):
        self.domain, self.n, self.seq, self.vocab = domain, num_samples, seq_length, vocab_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * self.domain + i)
        text = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def train_batches(num: int, mbs: int, seq: int, vocab: int, num_domains: int, device,
                  seed: int) -> List[Dict[str, torch.Tensor]]:
    """`num` micro-batches of random tokens on `device` (trainer.collate's keys)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        text = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append({"tokens": text[:, :-1], "labels": text[:, 1:],
                    "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq).contiguous(),
                    "domain_id": torch.randint(0, num_domains, (mbs,), generator=g)})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def logit_error(reference: torch.Tensor, test: torch.Tensor, vocab_size: int,
                chunk_tokens: int = 1024):
    """(relative L2, mean KL(softmax(reference) || softmax(test))) over tokens, in fp32.

    Both [..., v_padded]; columns from vocab_size on (padding) are ignored.
    """
    ref = reference[..., :vocab_size].reshape(-1, vocab_size)
    tst = test[..., :vocab_size].reshape(-1, vocab_size)
    num = den = kl = 0.0
    for i in range(0, ref.shape[0], chunk_tokens):
        r, t = ref[i:i + chunk_tokens].float(), tst[i:i + chunk_tokens].float()
        num += float((t - r).pow(2).sum())
        den += float(r.pow(2).sum())
        log_r, log_t = torch.log_softmax(r, -1), torch.log_softmax(t, -1)
        kl += float((log_r.exp() * (log_r - log_t)).sum())
    return math.sqrt(num / den), kl / ref.shape[0]


# ---------------------------------------------------------------------------------- runner
class Runner:
    """One student (DDP + optimizer) with a fixed teacher (or none): times optimizer steps."""

    def __init__(self, ctx, student_cfg, teacher, padded_vocab: int, vocab: int, bf16: bool,
                 num_domains: int):
        from megatron.core.transformer.module import Float16Module

        from megatron_ddk.config.schema import ParallelConfig, TrainConfig
        from megatron_ddk.losses.distill import DistillationLoss
        from megatron_ddk.models.build import build_gpt_model
        from megatron_ddk.models.pair import DistillationPair
        from megatron_ddk.training.optimizer import build_training_objects

        self.ctx, self.vocab = ctx, vocab
        self.student = build_gpt_model(student_cfg, ctx, padded_vocab, bf16=bf16)
        self.pair = DistillationPair(self.student, teacher)
        module = Float16Module(self.pair.config, self.pair) if bf16 else self.pair
        train = TrainConfig(lr=3e-5, min_lr=3e-6, lr_warmup_iters=1, train_iters=10**6)
        self.model, self.optimizer, _ = build_training_objects(
            module, train, ParallelConfig(), ctx, 10**6, bf16=bf16)
        self.loss = DistillationLoss(tp_group=ctx.tp_group, num_domains=num_domains,
                                     vocab_size=vocab, logits_layout="bsv")

    def step(self, batches, seq: int, mbs: int) -> float:
        """One optimizer step over `batches`; returns its loss (token mean)."""
        from megatron_ddk.training.schedule import forward_backward

        it = iter(batches)

        def forward_step(_data_iterator, model):
            b = next(it)
            out = model(b["tokens"], b["position_ids"], None)

            def loss_func(output):
                student_logits, teacher_logits = output
                return self.loss(student_logits, labels=b["labels"], loss_mask=b["loss_mask"],
                                 domain_id=b["domain_id"], teacher_logits=teacher_logits)

            return out, loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = forward_backward(self.ctx, [self.model], forward_step, len(batches), seq, mbs)
        self.optimizer.step()
        total = sum(r["loss"] for r in reports)
        return float(total[0] / total[1])

    def time_steps(self, batches, seq: int, mbs: int, warmup: int, steps: int):
        """(seconds per timed step, last loss)."""
        for _ in range(warmup):
            loss = self.step(batches, seq, mbs)
        _sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step(batches, seq, mbs)
        _sync()
        return (time.perf_counter() - t0) / steps, loss

    def eval_seconds(self, seq: int, mbs: int, domains: int, samples: int) -> float:
        """Wall time of one per-domain evaluation pass of the student (DDK's interval cost)."""
        from megatron_ddk.models.pair import DistillationPair
        from megatron_ddk.training.evaluate import evaluate_domains

        valid = [SyntheticDomain(d, samples, seq, self.vocab) for d in range(domains)]
        eval_student = DistillationPair(self.student, None)
        kwargs = dict(micro_batch_size=mbs, seq_length=seq, vocab_size=self.vocab,
                      with_teacher=False)
        evaluate_domains(eval_student, self.ctx, valid, **kwargs)  # warm-up
        _sync()
        t0 = time.perf_counter()
        losses, _, _ = evaluate_domains(eval_student, self.ctx, valid, **kwargs)
        _sync()
        if not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"evaluation gave non-finite losses {losses}")
        return time.perf_counter() - t0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    """Collect dropped models (their configs hold optimizer references in cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One line of the table."""

    seq: int
    """Sequence length."""

    run: str
    """What was measured (CPT, KD, DDK, teacher precision)."""

    step_s: Optional[float] = None
    """Seconds per optimizer step (None: not run; `note` says why)."""

    tokens_per_step: int = 0
    """Training tokens per optimizer step."""

    flops_per_step: float = 0.0
    """Model FLOPs per step: student 3x forward + teacher forward (+ evaluation / K for DDK)."""

    peak_gib: Optional[float] = None
    """Peak GPU memory allocated during the row (GiB); None on CPU."""

    fp8_error: Optional[tuple] = None
    """(relative L2, mean KL) of the FP8 teacher's logits against the bf16 teacher's."""

    note: str = ""
    """Free text: loss, evaluation cost, why a row did not run."""


def _measure(runner, args, seq: int, vocab: int) -> dict:
    """Time one runner at one sequence length."""
    mbs, nmb = args.micro_batch_size, args.num_microbatches
    batches = train_batches(nmb, mbs, seq, vocab, args.eval_domains, runner.ctx.device,
                            args.seed + seq)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_s, loss = runner.time_steps(batches, seq, mbs, args.warmup, args.steps)
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss} at seq {seq}")
    return {"step_s": step_s, "loss": loss, "first_batch": batches[0],
            "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                         if torch.cuda.is_available() else None)}


def _teacher_logits(teacher, batch) -> torch.Tensor:
    with torch.no_grad():
        return teacher(batch["tokens"], batch["position_ids"], None)


def _stage(name: str, ctx, args, cfgs: tuple, teacher, on_seq=None) -> List[Row]:
    """Rows of one run kind: a fresh student (+ optimizer) trained with `teacher` (or none).

    on_seq(seq, runner, measured, row) runs after each sequence length's timing.
    """
    from megatron_ddk.training.flops import FlopCounter

    student_cfg, teacher_cfg, vocab, padded, bf16 = cfgs
    runner = Runner(ctx, student_cfg, teacher, padded, vocab, bf16, args.eval_domains)
    tokens = args.micro_batch_size * args.num_microbatches
    rows = []
    for seq in args.seq_lengths:
        m = _measure(runner, args, seq, vocab)
        fc = FlopCounter(student_cfg, teacher_cfg if teacher is not None else None, seq, padded,
                         tokens * seq)
        row = Row(seq, name, m["step_s"], tokens * seq, fc.student_per_step + fc.teacher_per_step,
                  m["peak_gib"], None, f"loss {m['loss']:.3f}")
        if on_seq is not None:
            on_seq(seq, runner, m, row)
        rows.append(row)
    runner = None
    _free()
    return rows


def fp8_unavailable(args) -> str:
    """Why the FP8 rows cannot run here ("" when they can)."""
    from megatron_ddk.config import optional

    if not optional.have_transformer_engine():
        return NO_TE
    if args.impl != "transformer_engine":
        return "n/a (--impl local: FP8 needs the TE layers)"
    return ""


def run_rows(args, ctx=None) -> tuple:
    """Build the models, measure every row; returns (rows, header lines).

    ctx: a ParallelContext already started (tests); None starts a world-1 one.

    Order keeps the memory column honest: CPT runs with no teacher on the device, KD with the
    bf16 teacher only; the FP8 teacher is built (weights copied) when the bf16 one is freed,
    after its logits on each length's first micro-batch were kept on the host for the
    FP8-vs-bf16 comparison.
    """
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.fp8 import describe_fp8, recast_fp8_weights_every_forward
    from megatron_ddk.models.teacher import freeze
    from megatron_ddk.models.vocab import common_padded_vocab_size
    from megatron_ddk.parallel.state import initialize
    from megatron_ddk.training.flops import peak_flops

    ctx = ctx or initialize(seed=args.seed)
    bf16 = not args.cpu_smoke
    dtype = "bf16" if bf16 else "fp32"
    student_cfg, teacher_cfg, vocab = model_configs(args)
    padded = common_padded_vocab_size(student_cfg, teacher_cfg, vocab, 1)
    cfgs = (student_cfg, teacher_cfg, vocab, padded, bf16)
    eval_s: Dict[int, float] = {}
    reference: Dict[int, torch.Tensor] = {}

    def keep_eval(seq, runner, _m, _row):
        eval_s[seq] = runner.eval_seconds(seq, args.micro_batch_size, args.eval_domains,
                                          args.eval_samples)

    rows = _stage("CPT", ctx, args, cfgs, None, keep_eval)
    teacher = freeze(build_gpt_model(teacher_cfg, ctx, padded, bf16=bf16))

    def keep_reference(seq, _runner, m, _row):
        reference[seq] = _teacher_logits(teacher, m["first_batch"]).cpu()

    rows += _stage(f"KD, {dtype} teacher", ctx, args, cfgs, teacher, keep_reference)
    fp8_cfg = fp8_teacher_config(teacher_cfg, args)
    why = fp8_unavailable(args)
    if why:
        rows += [Row(seq, "KD, FP8 teacher", note=why) for seq in args.seq_lengths]
    else:
        teacher_fp8 = freeze(build_gpt_model(fp8_cfg, ctx, padded, bf16=bf16))
        copy_weights(teacher, teacher_fp8)
        recast_fp8_weights_every_forward(teacher_fp8)  # as models/teacher.py does for FP8
        teacher = None
        _free()

        def compare(seq, _runner, m, row):
            fp8 = _teacher_logits(teacher_fp8, m["first_batch"])
            row.fp8_error = logit_error(reference[seq].to(fp8.device), fp8, vocab)

        rows += _stage("KD, FP8 teacher", ctx, args, cfgs, teacher_fp8, compare)
    rows += _ddk_rows(rows, eval_s, args, student_cfg, padded)
    peak = peak_flops()
    header = [
        f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
        f"world 1; {dtype}; layers: {args.impl}; MFU against "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "n/a (unknown peak)"),
        f"student {student_cfg.num_layers} x (h {student_cfg.hidden_size}, ffn "
        f"{student_cfg.ffn_hidden_size}); teacher {teacher_cfg.num_layers} x (h "
        f"{teacher_cfg.hidden_size}, ffn {teacher_cfg.ffn_hidden_size}); vocab {vocab} "
        f"(padded {padded}); micro-batch {args.micro_batch_size} x {args.num_microbatches} "
        f"per step; {args.steps} timed steps after {args.warmup}",
        f"FP8 teacher: {describe_fp8(fp8_cfg) if not why else why}",
    ]
    return rows, header


def _ddk_rows(rows: List[Row], eval_s: Dict[int, float], args, student_cfg,
              padded: int) -> List[Row]:
    """DDK = the KD step + one evaluation pass every K steps (teacher ppl is computed once)."""
    from megatron_ddk.training.flops import forward_flops_per_token

    k, n = args.interval, args.eval_domains * args.eval_samples
    out = []
    for kd in [r for r in rows if r.run.startswith("KD")]:
        name = "DDK" + kd.run[2:] + f", K={k}"
        if kd.step_s is None or kd.seq not in eval_s:
            out.append(Row(kd.seq, name, note=kd.note or "n/a (no evaluation timing)"))
            continue
        e = eval_s[kd.seq]
        eval_flops = forward_flops_per_token(student_cfg, kd.seq, padded) * n * kd.seq
        out.append(Row(kd.seq, name, kd.step_s + e / k, kd.tokens_per_step,
                       kd.flops_per_step + eval_flops / k, kd.peak_gib, None,
                       f"eval {args.eval_domains}x{args.eval_samples} samples {e:.3f} s "
                       f"-> +{1000 * e / k:.2f} ms/step"))
    return out


def format_table(rows: List[Row], peak: Optional[float]) -> str:
    """The markdown table, rows ordered by sequence length."""
    lines = ["| seq | run | tokens/s | ms/step | MFU | TFLOP/s | peak GiB | "
             "FP8 teacher logits vs bf16 (rel L2 / KL) | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.seq):
        if r.step_s is None:
            cells = ["n/a"] * 5 + ["-"]
        else:
            flops_s = r.flops_per_step / r.step_s
            cells = [f"{r.tokens_per_step / r.step_s:,.0f}", f"{1000 * r.step_s:.1f}",
                     f"{100 * flops_s / peak:.1f}%" if peak else "n/a",
                     f"{flops_s / 1e12:.1f}" if flops_s >= 1e11 else f"{flops_s / 1e12:.4f}",
                     f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-",
                     f"{r.fp8_error[0]:.2e} / {r.fp8_error[1]:.2e}" if r.fp8_error else "-"]
        lines.append(f"| {r.seq} | {r.run} | " + " | ".join(cells) + f" | {r.note} |")
    return "\n".join(lines)


def smoke_settings(args) -> argparse.Namespace:
    """--cpu-smoke: tiny shapes and counts (the models come from model_configs)."""
    args.seq_lengths = [s for s in args.seq_lengths if s <= 64] or [32, 64]
    args.micro_batch_size, args.num_microbatches = 2, 2
    args.eval_domains, args.eval_samples = 3, 2
    args.warmup, args.steps, args.interval = 1, 2, 4
    if args.impl == "auto":
        args.impl = "local"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run stays on CPU on any host
        smoke_settings(args)
    elif not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    from megatron_ddk.config import optional
    from megatron_ddk.training.flops import peak_flops

    if args.impl == "auto":
        args.impl = "transformer_engine" if optional.have_transformer_engine() else "local"
    elif args.impl == "transformer_engine" and not optional.have_transformer_engine():
        print("--impl transformer_engine: Transformer Engine does not import on this host; "
              "use --impl local or auto", file=sys.stderr)
        return 2
    rows, header = run_rows(args)
    print("\n".join(header) + "\n")
    print(format_table(rows, peak_flops()))
    from megatron_ddk.parallel.state import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
