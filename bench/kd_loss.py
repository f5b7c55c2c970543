"""Benchmark: the vocab-parallel KL against the plain torch way, forward + backward, on CPU.

    .venv/bin/python bench/kd_loss.py                 # driver: every variant, prints a table
    .venv/bin/python bench/kd_loss.py --variant plain # one variant, prints one JSON line

Each variant runs in a fresh subprocess, one after another (the machine has ~24 GB). A variant
allocates fp32 student and teacher logits [tokens, 1, vocab] (student requires grad), runs
forward + backward `--reps` times, and reports the best wall time, the best CPU time (user + sys
of all threads: less sensitive to other processes sharing the cores) and its peak RSS
(resource.getrusage ru_maxrss). Extra memory = peak RSS minus the peak RSS of the `baseline`
process, which only allocates the same inputs; it is expressed in "logits copies" (one fp32
tokens x vocab tensor; 2048 x 151,936 x 4 bytes = 1.24 GB). The student gradient counts.

Variants:
    plain          log_softmax of both, F.kl_div(log_target=True, reduction="sum"), fp32
    ours           megatron_ddk.losses.vocab_parallel_kl, world-1 tp group, --chunk tokens/chunk
    ours_fused     megatron_ddk.losses.vocab_parallel_ce_and_kl (CE + KL in one pass)
    plain_fused    F.cross_entropy + the plain KL (what the fused variant replaces)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(tokens: int, vocab: int):
    import torch

    torch.manual_seed(0)
    # In place, so that creating the inputs has no transient peak above the two copies.
    student = torch.randn(tokens, 1, vocab).mul_(2).requires_grad_()
    teacher = torch.randn(tokens, 1, vocab).mul_(2)
    labels = torch.randint(0, vocab, (tokens, 1))
    return student, teacher, labels


def _step_fn(variant: str, chunk: int, temperature: float):
    import torch.nn.functional as F

    if variant.startswith("plain"):
        def plain_kl(s, t):
            if temperature != 1.0:
                s, t = s / temperature, t / temperature
            ls = F.log_softmax(s, dim=-1)
            lt = F.log_softmax(t, dim=-1)
            return F.kl_div(ls, lt, reduction="sum", log_target=True)

        if variant == "plain":
            return lambda s, t, y: plain_kl(s, t)
        return lambda s, t, y: (F.cross_entropy(s.view(-1, s.shape[-1]), y.view(-1),
                                                reduction="sum") + plain_kl(s, t))

    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    from megatron_ddk.losses import vocab_parallel_ce_and_kl, vocab_parallel_kl
    from megatron_ddk.testing.multiproc import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    group = dist.group.WORLD
    if variant == "ours":
        return lambda s, t, y: vocab_parallel_kl(s, t, tp_group=group, temperature=temperature,
                                                 chunk_tokens=chunk).sum()

    def fused(s, t, y):
        ce, kl = vocab_parallel_ce_and_kl(s, t, y, tp_group=group, temperature=temperature,
                                          chunk_tokens=chunk)
        return ce.sum() + kl.sum()

    return fused


def run_variant(args) -> dict:
    """Inside the subprocess: measure one variant, return its numbers."""
    import torch

    torch.set_num_threads(args.threads)
    student, teacher, labels = _inputs(args.tokens, args.vocab)
    out = {"variant": args.variant, "chunk": args.chunk}
    if args.variant != "baseline":
        step = _step_fn(args.variant, args.chunk, args.temperature)
        times, cpu = [], []
        for _ in range(args.reps):
            student.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(student, teacher, labels)
            loss.backward()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            del loss
        out.update(time_s=min(times), cpu_s=min(cpu), times=times)
        assert student.grad is not None  # the gradient stays alive: it counts toward the peak
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _spawn(args, variant: str, chunk: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--chunk", str(chunk),
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--reps", str(args.reps),
           "--threads", str(args.threads), "--temperature", str(args.temperature)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def drive(args) -> None:
    """Run every variant in its own process, sequentially, and print the table."""
    copy = args.tokens * args.vocab * 4
    base = _spawn(args, "baseline", 0)
    rows = []
    plan = [("plain", 0)] + [("ours", c) for c in args.chunks]
    if args.fused:
        plan += [("plain_fused", 0), ("ours_fused", args.chunks[0])]
    for variant, chunk in plan:
        r = _spawn(args, variant, chunk)
        r["extra"] = (r["peak_rss"] - base["peak_rss"]) / copy
        rows.append(r)
        print(f"  done {variant} chunk={chunk}: {r['time_s']:.2f} s, {r['cpu_s']:.2f} s CPU, "
              f"{r['extra']:.2f} copies",
              file=sys.stderr)
    print(f"\nKD loss forward+backward, {args.tokens} tokens x V={args.vocab:,}, fp32, "
          f"T={args.temperature:g}, {args.threads} threads, best of {args.reps}; "
          f"one logits copy = {copy / 1e9:.2f} GB; baseline RSS {base['peak_rss'] / 1e9:.2f} GB\n")
    print("| variant | chunk_tokens | wall (s) | CPU (s) | extra peak memory (logits copies) | "
          "wall vs plain | CPU vs plain | memory vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    refs = {"plain": rows[0]}
    for r in rows:
        ref = refs.setdefault(r["variant"], r) if r["variant"].startswith("plain") else None
        ref = ref or (refs["plain_fused"] if r["variant"] == "ours_fused" else refs["plain"])
        chunk = r["chunk"] if r["variant"].startswith("ours") else "-"
        print(f"| {r['variant']} | {chunk} | {r['time_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{r['extra']:.2f} | {r['time_s'] / ref['time_s']:.2f} | "
              f"{r['cpu_s'] / ref['cpu_s']:.2f} | {r['extra'] / ref['extra']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", choices=["baseline", "plain", "ours", "ours_fused", "plain_fused"])
    p.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of one 'ours' run")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 64, 32, 16],
                   help="chunk_tokens values the driver runs for 'ours'")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--fused", action="store_true", help="also compare CE + KL fused vs plain")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
