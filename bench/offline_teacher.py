"""Benchmark: the offline teacher (top-K store) against online KD and CPT at the quickstart's sizes.

    .venv/bin/python bench/offline_teacher.py                        # quickstart budget
    .venv/bin/python bench/offline_teacher.py --steps 60 --teacher-steps 120   # shorter

Sizes are examples/quickstart/*.yaml: teacher 4 x 256, student 2 x 128, seq 256, global batch 16
(micro-batch 8), a 4,096-token tokenizer. Steps 120 for every arm unless --steps says otherwise.

1. Prepare (skipped when --workdir already holds it): the quickstart pipeline's corpus, datasets,
   teacher (--teacher-steps) and starting student (--student-steps), through `megatron-ddk
   pipeline` with one 1-step placeholder arm.
2. In one sequence on this machine: CPT, KD online, the store's producer (tools/cache_teacher_
   logits.py, covering exactly the samples a KD run of --steps draws: data/teacher_store.
   max_samples_per_domain), then KD offline at every K of --ks. Each arm is a `python -m
   megatron_ddk.train` process (KD policy static, the quickstart's lr and finetuned start);
   reported: the training loop's wall time (metrics.jsonl "end".elapsed_s without the final
   checkpoint write), the process's wall time, its CPU seconds (user + sys, start-up included:
   less sensitive to other processes on the cores), and the step-time split (teacher_forward,
   teacher_cache_read, student, optimizer).
3. Per K: store bytes per token (the files on disk / tokens covered), the mean relative error of
   the top-K KL (K ids + one rest bucket, log-probabilities rounded to the store's float16)
   against the exact KL on held-out tokens (every validation sample of every domain; teacher vs
   the starting student), and the final per-domain test (else validation) perplexity of each
   arm (`megatron-ddk eval`), offline vs online.
4. Storage the paper's 15B tokens would need at each K (tools/plan_teacher_store.py's formula).

Prints a table and the acceptance ratios: KD offline wall / CPT wall (<= 1.2), teacher_cache_read
share of the step (<= 10%), offline vs online KD perplexity (within 1%). Also writes
<workdir>/bench_offline_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable


def sh(args, log):
    """Run a repo command (OMP_NUM_THREADS unchanged); returns (wall s, cpu s); raises on error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.call([PY] + args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        raise SystemExit(f"{' '.join(args)} exited {code}; see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare(work, teacher_steps, student_steps, domains):
    """Data, teacher and starting student from the quickstart pipeline (one placeholder arm)."""
    import yaml

    paths = {"manifest": os.path.join(work, "data", "datasets", "manifest.yaml"),
             "teacher": os.path.join(work, "runs", "teacher", "ckpt"),
             "student": os.path.join(work, "runs", "student", "ckpt")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    with open(os.path.join(ROOT, "examples", "quickstart", "pipeline.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg.pop("smoke", None)
    cfg["out"] = work
    cfg["teacher"]["run"]["train"]["train_iters"] = teacher_steps
    cfg["student"]["run"]["train"]["train_iters"] = student_steps
    if domains:
        cfg["data"]["domains"] = domains
    cfg["arms"] = [{"name": "prep", "teacher": False,
                    "run": {"ddk": {"policy": "static"},
                            "train": {"train_iters": 2, "lr_warmup_iters": 1}}}]
    cfg["export"] = {"arms": []}
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "bench_pipeline.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    print(f"preparing {work} (pipeline: data, teacher {teacher_steps} steps, student "
          f"{student_steps} steps) ...", flush=True)
    sh(["-m", "megatron_ddk.cli", "pipeline", "--config", path],
       os.path.join(work, "prepare.log"))
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"the pipeline did not produce {missing}; see {work}/logs/")
    return paths


def arm_config(work, paths, name, steps, teacher=True, store=None):
    """examples/quickstart/ddk.yaml as KD (policy static) or CPT, paths into `work`."""
    import yaml

    with open(os.path.join(ROOT, "examples", "quickstart", "ddk.yaml")) as f:
        cfg = yaml.safe_load(f)
    run_dir = os.path.join(work, "arms", name)
    cfg["data"]["manifest"] = paths["manifest"]
    cfg["data"]["cache_dir"] = os.path.join(work, "cache")
    cfg["ddk"]["policy"] = "static"
    cfg["train"]["train_iters"] = steps
    cfg["checkpoint"] = {"save": os.path.join(run_dir, "ckpt"), "load": paths["student"],
                         "finetune": True, "overwrite": True}
    cfg["logging"] = {"run_dir": run_dir, "log_interval": 10, "tensorboard": False}
    if teacher:
        cfg["distill"]["teacher_load"] = paths["teacher"]
        if store:
            cfg["distill"]["teacher_logits"] = store
    else:
        cfg["distill"] = {"teacher": None}
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, run_dir


def end_record(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    end = [r for r in recs if r["kind"] == "end"][-1]
    steps = [r for r in recs if r["kind"] == "step"]
    return end, steps


def train_arm(work, paths, name, steps, **kw):
    path, run_dir = arm_config(work, paths, name, steps, **kw)
    print(f"  {name} ...", flush=True)
    wall, cpu = sh(["-m", "megatron_ddk.train", "--config", path],
                   os.path.join(run_dir, "train.out"))
    end, _ = end_record(run_dir)
    # the loop's wall time without the final checkpoint write (the same for every arm)
    loop = end["elapsed_s"] - end["timing"].get("checkpoint", 0.0)
    return {"name": name, "config": path, "run_dir": run_dir, "process_wall_s": wall,
            "cpu_s": cpu, "loop_s": loop, "timing": end["timing"]}


def coverage(paths, steps, interval, seed, gbs, seq_length):
    """Samples per domain a KD (static, natural weights) run of `steps` draws: exactly."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.teacher_store import max_samples_per_domain

    manifest = load_manifest(paths["manifest"])
    sizes = []
    for d in manifest.domains:
        total = 0
        for prefix in d.train_prefixes:
            ds = IndexedDataset(prefix, mmap=True)
            total += max(0, (int(np.sum(ds.sequence_lengths, dtype=np.int64)) - 1) // seq_length)
            del ds
        sizes.append(total)
    need = max_samples_per_domain(sizes, gbs, interval, steps, "static",
                                  weights=manifest.natural_weights(), seed=seed)
    return int(need.max()), [int(x) for x in need]


def store_bytes(store):
    total = 0
    for d, _, files in os.walk(store):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files
                     if f.startswith(("topk_", "rest_")))
    return total


def evaluate(cfg_path, ckpt, out_json, log):
    """Per-domain test perplexity of a checkpoint (validation when --split is unsupported)."""
    base = ["-m", "megatron_ddk.cli", "eval", "--config", cfg_path, "--load", ckpt,
            "--output", out_json]
    try:
        sh(base + ["--split", "test"], log)
        split = "test"
    except SystemExit:
        sh(base, log)
        split = "valid"
    with open(out_json) as f:
        res = json.load(f)["domains"]
    tokens = sum(r["tokens"] for r in res.values())
    mean_loss = sum(r["loss"] * r["tokens"] for r in res.values()) / tokens
    return {"split": split, "ppl": math.exp(mean_loss),
            "domains": {n: r["ppl"] for n, r in res.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_offline_teacher"))
    p.add_argument("--steps", type=int, default=120, help="steps of every arm (quickstart: 120)")
    p.add_argument("--teacher-steps", type=int, default=240)
    p.add_argument("--student-steps", type=int, default=80)
    p.add_argument("--ks", default="8,32,128", help="K values of the table")
    p.add_argument("--default-k", type=int, default=32)
    p.add_argument("--domains", default="c_headers,english_prose,licenses,python_code",
                   help="demo-corpus domains to use (the quickstart's four, whose tokenizer "
                        "trains at 4,096 entries; empty: every domain of the pipeline)")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir)
    ks = sorted({int(k) for k in args.ks.split(",")} | {args.default_k})
    paths = prepare(work, args.teacher_steps, args.student_steps,
                    [d for d in args.domains.split(",") if d])
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                           "quickstart", "ddk.yaml")) as f:
        import yaml

        q = yaml.safe_load(f)
    gbs, seq = q["train"]["global_batch_size"], q["data"]["seq_length"]
    n_cover, per_domain = coverage(paths, args.steps, q["ddk"]["interval"],
                                   q["train"].get("seed", 1234), gbs, seq)
    print(f"load before the arms: {os.getloadavg()}; store covers {n_cover} samples/domain "
          f"({per_domain})", flush=True)
    arms = {"CPT": train_arm(work, paths, "CPT", args.steps, teacher=False),
            "KD online": train_arm(work, paths, "KD_online", args.steps)}
    stores = {}
    for k in ks:
        store = os.path.join(work, f"store_k{k}")
        cfg_path = arms["KD online"]["config"]
        print(f"  producer K={k} ...", flush=True)
        wall, cpu = sh(["tools/cache_teacher_logits.py", "--config", cfg_path, "--out", store,
                        "--top-k", str(k), "--max-samples-per-domain", str(n_cover)],
                       os.path.join(work, f"store_k{k}.log"))
        with open(os.path.join(store, "header.json")) as f:
            header = json.load(f)
        tokens = sum(d["num_covered"] for d in header["domains"].values()) * seq
        stores[k] = {"producer_wall_s": wall, "producer_cpu_s": cpu, "tokens": tokens,
                     "bytes_per_token": store_bytes(store) / tokens,
                     "header_bytes_per_token": header["bytes_per_token"]}
        arms[f"KD offline K={k}"] = train_arm(work, paths, f"KD_offline_k{k}", args.steps,
                                              store=store)
    print(f"load after the arms: {os.getloadavg()}", flush=True)
    errors = kl_errors(paths, arms["KD online"]["config"], ks)
    for name, arm in arms.items():
        arm["eval"] = evaluate(arm["config"], os.path.join(arm["run_dir"], "ckpt"),
                               os.path.join(arm["run_dir"], "eval.json"),
                               os.path.join(arm["run_dir"], "eval.log"))
    report(arms, stores, errors, ks, args, work, n_cover)


def kl_errors(paths, cfg_path, ks):
    """Mean relative error of the top-K KL vs the exact KL on held-out (validation) tokens."""
    out = subprocess.run([PY, os.path.join(ROOT, "bench", "offline_teacher_kl.py"), "--config",
                          cfg_path, "--student", paths["student"], "--ks",
                          ",".join(map(str, ks))], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench/offline_teacher_kl.py failed:\n{out.stdout[-3000:]}"
                         f"\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(arms, stores, errors, ks, args, work, n_cover):
    from megatron_ddk.data.teacher_store import bytes_per_token

    cpt, online = arms["CPT"], arms["KD online"]
    print(f"\n{args.steps} steps x 16 x 256 tokens per arm (quickstart sizes"
          f"{'' if args.steps == 120 else '; quickstart uses 120 steps'}); store covers "
          f"{n_cover} samples per domain\n")
    head = (f"{'arm':<18} {'loop s':>8} {'x CPT':>6} {'proc s':>8} {'cpu s':>8} {'x CPT':>6} "
            f"{'teacher_fwd':>11} {'cache_read':>10} {'read %':>7} {'ppl':>8} {'vs online':>9}")
    print(head)
    for name, a in arms.items():
        t = a["timing"]
        step = t.get("student_forward_backward", 0) + t.get("teacher_forward", 0) + \
            t.get("teacher_cache_read", 0) + t.get("optimizer", 0)
        a["read_share"] = t.get("teacher_cache_read", 0.0) / step if step else 0.0
        print(f"{name:<18} {a['loop_s']:>8.1f} {a['loop_s'] / cpt['loop_s']:>6.2f} "
              f"{a['process_wall_s']:>8.1f} {a['cpu_s']:>8.1f} {a['cpu_s'] / cpt['cpu_s']:>6.2f} "
              f"{t.get('teacher_forward', 0):>11.1f} {t.get('teacher_cache_read', 0):>10.2f} "
              f"{100 * a['read_share']:>6.2f}% {a['eval']['ppl']:>8.3f} "
              f"{100 * (a['eval']['ppl'] / online['eval']['ppl'] - 1):>+8.2f}%")
    print(f"\n{'K':>5} {'bytes/token':>12} {'formula':>8} {'producer s':>11} "
          f"{'KL rel. err':>12} {'15B tokens':>11}")
    for k in ks:
        s = stores[k]
        tb = 15e9 * bytes_per_token(k, 151_646) / 1e12
        print(f"{k:>5} {s['bytes_per_token']:>12.1f} {s['header_bytes_per_token']:>8d} "
              f"{s['producer_wall_s']:>11.1f} {errors[str(k)]:>12.4f} {tb:>9.2f} TB")
    off = arms[f"KD offline K={args.default_k}"]
    print(f"\nacceptance (default K={args.default_k}):")
    print(f"  KD offline loop / CPT loop = {off['loop_s'] / cpt['loop_s']:.3f} (target <= 1.2; "
          f"online {online['loop_s'] / cpt['loop_s']:.3f}); CPU time ratio "
          f"{off['cpu_s'] / cpt['cpu_s']:.3f}")
    print(f"  teacher_cache_read = {100 * off['read_share']:.2f}% of the step (target <= 10%)")
    print(f"  {off['eval']['split']} ppl offline {off['eval']['ppl']:.4f} vs online "
          f"{online['eval']['ppl']:.4f}: {100 * (off['eval']['ppl'] / online['eval']['ppl'] - 1):+.3f}%"
          f" (target within 1%)")
    with open(os.path.join(work, "bench_offline_teacher.json"), "w") as f:
        json.dump({"arms": arms, "stores": {str(k): v for k, v in stores.items()},
                   "kl_rel_error": errors, "steps": args.steps}, f, indent=1)


if __name__ == "__main__":
    main()
