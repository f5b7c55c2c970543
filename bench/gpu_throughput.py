"""Single-GPU throughput of CPT, KD (bf16 / FP8 teacher) and DDK, with MFU, time split and memory.

    # one H100: LLaMA-shaped pair, seq 2048 and 4096
    python bench/gpu_throughput.py
    python bench/gpu_throughput.py --pair qwen --seq-lengths 4096 --micro-batch-size 2
    python bench/gpu_throughput.py --json-out runs/gpu_check/throughput.json   # also a JSON copy
    python bench/gpu_throughput.py --cpu-smoke          # same code path, tiny fp32 shapes, on CPU

The pair (bench/gpu_bench_models.py) fits one 80 GB GPU: by default a small LLaMA-shaped student
(16 x hidden 2048, GQA, 0.84B parameters) and a teacher with LLaMA-2-7B-shaped layers (12 of 32,
2.7B), vocabulary 32,000, bf16; --pair qwen keeps the earlier Qwen-1.5-shaped pair. Steps are
composed from the project's own pieces (bench/gpu_bench_runner.py), as the trainer composes them.

Rows (per sequence length):
- CPT: the student alone (CE).
- KD, bf16 teacher: CE + gamma * KL with a frozen bf16 teacher forward in every micro-batch.
- KD, FP8 teacher: the same teacher weights with ModelConfig.fp8 set (Transformer Engine only;
  "skipped: Transformer Engine not installed" otherwise).
- DDK: the KD step plus one per-domain evaluation pass (student forward over
  --eval-domains x --eval-samples samples, training/evaluate.evaluate_domains) every
  --interval steps, amortised: time/step = KD step + evaluation / K.
MFU counts the student's training FLOPs (3x forward) and the teacher's forward FLOPs
(training/flops.FlopCounter), plus the amortised evaluation forward for DDK, against the dense
bf16 peak (also for the FP8 rows). The teacher / student column splits each step's time into the
teacher's forward and the student's forward + backward (training/timing.StageTimer); the memory
columns give the peak allocated and megatron-ddk plan-memory's prediction (models/memory.py, without
its fixed overhead). The FP8 column compares the FP8 teacher's logits with the bf16 teacher's on
the same batch: relative L2 and mean KL(bf16 || FP8) per token, in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
for _path in (ROOT, BENCH):  # the package, and the sibling bench modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_bench_models import PAIRS, copy_weights, logit_error, model_configs, num_params  # noqa: E402,F401
from gpu_bench_runner import Row, free, stage  # noqa: E402

NO_GPU = ("bench/gpu_throughput.py measures tokens/s and MFU on one CUDA GPU, and this host has "
          "none (torch.cuda.is_available() is False). Run it on a GPU host (docs/fp8.md), or "
          "pass --cpu-smoke for a tiny fp32 run of the same code path.")
NO_TE = "skipped: Transformer Engine not installed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=4,
                   help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--pair", choices=PAIRS, default="llama",
                   help="model shapes (bench/gpu_bench_models.py)")
    p.add_argument("--student-layers", type=int, default=None,
                   help="student depth (default: llama 16, qwen 8 of the 1.8B shape's 24)")
    p.add_argument("--teacher-layers", type=int, default=None,
                   help="teacher depth (default: llama 12, qwen 8 of the 7B shape's 32)")
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
    p.add_argument("--json-out", default=None, help="also write the rows and header as JSON")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny fp32 shapes on CPU (no MFU): exercises the code path in tests")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- set-up
def fp8_teacher_config(teacher, args):
    """The teacher's ModelConfig with FP8 switched on (Transformer Engine layers)."""
    return dataclasses.replace(teacher, transformer_impl="transformer_engine",
                               fp8=args.fp8_format, fp8_recipe=args.fp8_recipe,
                               fp8_amax_history_len=args.fp8_amax_history_len)


def _teacher_logits(teacher, batch) -> torch.Tensor:
    with torch.no_grad():
        return teacher(batch["tokens"], batch["position_ids"], None)


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

    rows = stage("CPT", ctx, args, cfgs, None, keep_eval)
    teacher = freeze(build_gpt_model(teacher_cfg, ctx, padded, bf16=bf16))

    def keep_reference(seq, _runner, m, _row):
        reference[seq] = _teacher_logits(teacher, m["first_batch"]).cpu()

    rows += stage(f"KD, {dtype} teacher", ctx, args, cfgs, teacher, keep_reference)
    fp8_cfg = fp8_teacher_config(teacher_cfg, args)
    why = fp8_unavailable(args)
    if why:
        rows += [Row(seq, "KD, FP8 teacher", note=why) for seq in args.seq_lengths]
    else:
        teacher_fp8 = freeze(build_gpt_model(fp8_cfg, ctx, padded, bf16=bf16))
        copy_weights(teacher, teacher_fp8)
        recast_fp8_weights_every_forward(teacher_fp8)  # as models/teacher.py does for FP8
        teacher = None
        free()

        def compare(seq, _runner, m, row):
            fp8 = _teacher_logits(teacher_fp8, m["first_batch"])
            row.fp8_error = logit_error(reference[seq].to(fp8.device), fp8, vocab)

        rows += stage("KD, FP8 teacher", ctx, args, cfgs, teacher_fp8, compare)
    rows += _ddk_rows(rows, eval_s, args, student_cfg, padded)
    peak = peak_flops()
    header = [
        f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
        f"world 1; {dtype}; layers: {args.impl}; MFU against "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "n/a (unknown peak)"),
        f"pair {args.pair if not args.cpu_smoke else 'cpu-smoke'}: student "
        f"{num_params(student_cfg, padded) / 1e9:.2f}B = {student_cfg.num_layers} x (h "
        f"{student_cfg.hidden_size}, ffn {student_cfg.ffn_hidden_size}); teacher "
        f"{num_params(teacher_cfg, padded) / 1e9:.2f}B = {teacher_cfg.num_layers} x (h "
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
                       f"-> +{1000 * e / k:.2f} ms/step", kd.teacher_s, kd.student_s,
                       kd.predicted_gib))
    return out


def mfu(row: Row, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation of a row (teacher forward counted), or None."""
    if row.step_s is None or not peak:
        return None
    return row.flops_per_step / row.step_s / peak


def _split(r: Row) -> str:
    if r.teacher_s is None or r.student_s is None:
        return "-"
    total = r.teacher_s + r.student_s
    return (f"{1000 * r.teacher_s:.0f} / {1000 * r.student_s:.0f} ms "
            f"({100 * r.teacher_s / total:.0f}% teacher)" if total > 0 else "-")


def format_table(rows: List[Row], peak: Optional[float]) -> str:
    """The markdown table, rows ordered by sequence length (notes stay the 9th column)."""
    lines = ["| seq | run | tokens/s | ms/step | MFU | TFLOP/s | peak GiB | "
             "FP8 teacher logits vs bf16 (rel L2 / KL) | notes | teacher fwd / student f+b | "
             "predicted GiB (plan_memory) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.seq):
        if r.step_s is None:
            cells = ["n/a"] * 5 + ["-"]
        else:
            flops_s = r.flops_per_step / r.step_s
            u = mfu(r, peak)
            cells = [f"{r.tokens_per_step / r.step_s:,.0f}", f"{1000 * r.step_s:.1f}",
                     f"{100 * u:.1f}%" if u is not None else "n/a",
                     f"{flops_s / 1e12:.1f}" if flops_s >= 1e11 else f"{flops_s / 1e12:.4f}",
                     f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-",
                     f"{r.fp8_error[0]:.2e} / {r.fp8_error[1]:.2e}" if r.fp8_error else "-"]
        predicted = "-" if r.predicted_gib is None else (
            f"{r.predicted_gib:.1f}" if r.predicted_gib >= 1 else f"{r.predicted_gib:.3f}")
        lines.append(f"| {r.seq} | {r.run} | " + " | ".join(cells)
                     + f" | {r.note} | {_split(r)} | {predicted} |")
    return "\n".join(lines)


def write_json(path: str, rows: List[Row], header: List[str], peak: Optional[float]) -> None:
    """Rows (with MFU), header and table as JSON, written atomically."""
    data = {"header": header, "peak_flops": peak, "table": format_table(rows, peak),
            "rows": [dict(dataclasses.asdict(r), mfu=mfu(r, peak)) for r in rows]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


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
    if args.json_out:
        write_json(args.json_out, rows, header, peak_flops())
    from megatron_ddk.parallel.state import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
