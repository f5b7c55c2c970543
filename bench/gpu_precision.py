"""bf16 against fp32: the KD loss of the benchmark pair on one batch, same weights, both precisions.

    python bench/gpu_precision.py                       # one GPU: LLaMA-shaped pair, seq 2048
    python bench/gpu_precision.py --json-out runs/gpu_check/precision.json
    python bench/gpu_precision.py --cpu-smoke           # tiny models on CPU (the test-suite)

The student and the frozen teacher (bench/gpu_bench_models.py) are built as training builds them
in bf16 (bf16 configs and weights, training/builder.float16_wrap: Megatron-Core's Float16Module,
bf16 logits into the loss), and a second time with fp32 configs holding the same weights
(upcast, TF32 off, so fp32 is fp32): only the arithmetic differs. The distillation loss (CE +
gamma KL, losses/distill.py) is computed on one batch by both.

Agreement is judged against a bound from bf16's 8-bit significand (unit roundoff u = 2^-8, one
rounding has rms error u / sqrt(3)): the logits pass K ~ 12 roundings per layer (+ 4 for the
embedding, final norm and output layer), so their relative error is ~ sqrt(K) u / sqrt(3); a
token's loss moves by at most sqrt(2) x that x the logits' rms (for CE; gamma x the student's and
the teacher's for the KL), and the mean over N tokens divides the spread by sqrt(N). The check
passes when |loss_bf16 - loss_fp32| is within 6 of those standard deviations, with the logits'
rms measured here. The relative L2 error of each model's logits is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_bench_models import PAIRS, copy_weights, model_configs, train_batches  # noqa: E402

U = 2.0 ** -8
ROUNDINGS_PER_LAYER, ROUNDINGS_OUTSIDE = 12, 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=PAIRS, default="llama")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--student-layers", type=int, default=None)
    p.add_argument("--teacher-layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json-out", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU")
    args = p.parse_args(argv)
    args.impl = "local"  # the same layers in both precisions
    if args.cpu_smoke:
        args.seq_length, args.micro_batch_size = 32, 2
    args.seq_lengths = [args.seq_length]
    return args


def loss_tolerance(num_layers: int, rms_student: float, rms_teacher: float, gamma: float,
                   tokens: int) -> float:
    """6 standard deviations of the bf16 error of the token-mean loss (module docstring)."""
    rel = math.sqrt(ROUNDINGS_PER_LAYER * num_layers + ROUNDINGS_OUTSIDE) * U / math.sqrt(3)
    per_token = math.sqrt(2) * rel * (rms_student + gamma * (rms_student + rms_teacher))
    return 6 * per_token / math.sqrt(tokens)


def _loss(pair, loss_fn, batch) -> dict:
    with torch.no_grad():
        student, teacher = pair(batch["tokens"], batch["position_ids"], None)
        total, tokens, report = loss_fn(student, labels=batch["labels"],
                                        loss_mask=batch["loss_mask"], domain_id=batch["domain_id"],
                                        teacher_logits=teacher)
    count = float(tokens)
    return {"loss": float(total) / count, "lm_loss": float(report["lm_loss"][0]) / count,
            "kd_loss": float(report["kd_loss"][0]) / count, "tokens": int(count),
            "student": student.float().cpu(), "teacher": teacher.float().cpu(),
            "dtype": str(student.dtype)}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(args, ctx) -> dict:
    """Build the pair in fp32, compute the loss, cast to bf16 as training does, compute again."""
    from megatron_ddk.losses.distill import DistillationLoss
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.pair import DistillationPair
    from megatron_ddk.models.teacher import freeze
    from megatron_ddk.models.vocab import common_padded_vocab_size
    from megatron_ddk.training.builder import float16_wrap

    student_cfg, teacher_cfg, vocab = model_configs(args)
    padded = common_padded_vocab_size(student_cfg, teacher_cfg, vocab, 1)
    loss_fn = DistillationLoss(tp_group=ctx.tp_group, num_domains=4, vocab_size=vocab,
                               logits_layout="bsv")
    batch = train_batches(1, args.micro_batch_size, args.seq_length, vocab, 4, ctx.device,
                          args.seed)[0]

    def build(bf16: bool):
        return DistillationPair(build_gpt_model(student_cfg, ctx, padded, bf16=bf16),
                                freeze(build_gpt_model(teacher_cfg, ctx, padded, bf16=bf16)))

    # the bf16 pair as training builds it; an fp32 pair (fp32 configs) holding the same weights
    pair_bf16 = float16_wrap(build(True), True)
    pair_fp32 = build(False)
    copy_weights(pair_bf16.module, pair_fp32)
    for pair in (pair_bf16, pair_fp32):
        pair.eval()
    fp32 = _loss(pair_fp32, loss_fn, batch)
    del pair_fp32
    bf16 = _loss(pair_bf16, loss_fn, batch)
    rms_s = float(fp32["student"].pow(2).mean().sqrt())
    rms_t = float(fp32["teacher"].pow(2).mean().sqrt())
    tol = loss_tolerance(max(student_cfg.num_layers, teacher_cfg.num_layers), rms_s, rms_t,
                         loss_fn.gamma, fp32["tokens"])
    diff = {k: bf16[k] - fp32[k] for k in ("loss", "lm_loss", "kd_loss")}
    return {"fp32": {k: fp32[k] for k in ("loss", "lm_loss", "kd_loss", "dtype")},
            "bf16": {k: bf16[k] for k in ("loss", "lm_loss", "kd_loss", "dtype")},
            "difference": diff, "tolerance": tol, "tokens": fp32["tokens"],
            "logits_rel_l2": {"student": _rel_l2(bf16["student"], fp32["student"]),
                              "teacher": _rel_l2(bf16["teacher"], fp32["teacher"])},
            "logits_rms": {"student": rms_s, "teacher": rms_t},
            "ok": all(abs(v) <= tol for v in diff.values()) and bf16["dtype"] == "torch.bfloat16",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "pair": "cpu-smoke" if args.cpu_smoke else args.pair, "seq_length": args.seq_length}


def format_result(r: dict) -> str:
    lines = [f"bf16 vs fp32 on {r['device']} ({r['pair']} pair, {r['tokens']} tokens, one batch):",
             "| quantity | fp32 | bf16 | bf16 - fp32 |", "|---|---|---|---|"]
    for k in ("loss", "lm_loss", "kd_loss"):
        lines.append(f"| {k} | {r['fp32'][k]:.6f} | {r['bf16'][k]:.6f} | "
                     f"{r['difference'][k]:+.2e} |")
    lines.append(f"tolerance {r['tolerance']:.2e} (6 sigma of bf16 rounding, logits rms "
                 f"student {r['logits_rms']['student']:.3f} / teacher "
                 f"{r['logits_rms']['teacher']:.3f}); logits relative L2: student "
                 f"{r['logits_rel_l2']['student']:.2e}, teacher "
                 f"{r['logits_rel_l2']['teacher']:.2e}; {'PASS' if r['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        print("bench/gpu_precision.py compares bf16 with fp32 on a CUDA GPU and this host has "
              "none; pass --cpu-smoke for the tiny CPU run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    from megatron_ddk.parallel import destroy, initialize

    ctx = initialize(seed=args.seed)
    try:
        result = compare(args, ctx)
    finally:
        destroy()
    print(format_result(result))
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        tmp = f"{args.json_out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json_out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
