"""Benchmark: the offline teacher store's encodings at the quickstart's sizes (issue 30's table).

    .venv/bin/python bench/offline_teacher.py                 # reuses runs/quickstart
    .venv/bin/python bench/offline_teacher.py --arms v1:32:1:float16,v2:24:1:q4:ef

Sizes are the quickstart's (megatron_ddk/examples/quickstart/pipeline.yaml): teacher 4 x 256
(240 steps), student 2 x 128 (80 steps), seq 256, a 4,096-token tokenizer, five demo domains;
the KD arm continues the student for 60 steps x 8 x 256 tokens. The data, the teacher, the
starting student and the KD arm's config come from a finished quickstart pipeline folder
(--pipeline, default runs/quickstart: `megatron-ddk pipeline --config
megatron_ddk/examples/quickstart/pipeline.yaml`), so nothing is re-trained.

1. The grid (bench/offline_teacher_kl.py): format 1 (the fixed-K float16 store) and format 2
   for every K x top_p x codec x id codec, on held-out tokens: KL error per token against the
   dense teacher (mean, p99), entries per token, bytes per token of a real store on disk (none /
   zstd), read throughput (tokens/s, cold and warm page cache).
2. Per --arms setting, in one sequence on this machine: the producer (`megatron-ddk
   cache-teacher ... --cover-runs KD.yaml`: exactly the samples the KD arm draws), the KD arm
   reading that store (`python -m megatron_ddk.train`), its test-split perplexity (`megatron-ddk
   eval`), the share of the step spent reading the store (the trainer's teacher_cache_read).
3. Bytes per token for a 152k vocabulary (Qwen-1.5's 151,646) from the measured entries per
   token (data/store_codec.bytes_per_token, uncompressed: packed 18-bit ids; ef the most its ids
   can take at that vocabulary whatever they are, never the demo's 4,096-token ids), against
   format 1 at K = 32 (196 bytes), and what one training step needs from the store against its
   step time.

Prints the tables and the acceptance lines; writes <workdir>/bench_offline_teacher.json.
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
QWEN15_VOCAB = 151_646


def sh(args, log):
    """Run a repo command; returns (wall s, cpu s); raises on error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.call([PY] + args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        raise SystemExit(f"{' '.join(args)} exited {code}; see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def parse_arm(text):
    """'online' / 'v1:32:1:float16' / 'v2:16:0.95:q8[:zstd|none][:ef|packed][:t<M>]' -> dict (no
    id codec given: packed, the labels of the runs before ef; t<M>: M tail samples per token)."""
    if text == "online":
        return {"fmt": 0, "k": 0, "top_p": 1.0, "codec": "", "compression": "none",
                "id_codec": "", "label": "KD online (same run)"}
    parts = text.split(":")
    fmt, k, p, codec = int(parts[0][1:]), int(parts[1]), float(parts[2]), parts[3]
    comp, id_codec, tail = "none", "packed", 0
    for extra in parts[4:]:
        if extra in ("none", "zstd"):
            comp = extra
        elif extra in ("packed", "ef"):
            id_codec = extra
        elif extra[:1] == "t" and extra[1:].isdigit():
            tail = int(extra[1:])
        else:
            raise SystemExit(f"--arms {text!r}: {extra!r} is neither a compression (none, zstd), "
                             f"an id codec (packed, ef) nor tail samples (t<M>)")
    label = (f"v1 float16 K={k}" if fmt == 1 else f"v2 {codec} K={k} p={p:g}"
             + ("" if id_codec == "packed" else f" {id_codec}")
             + ("" if comp == "none" else f" {comp}") + (f" tail={tail}" if tail else ""))
    return {"fmt": fmt, "k": k, "top_p": p, "codec": codec, "compression": comp,
            "id_codec": id_codec if fmt == 2 else "", "tail_samples": tail, "label": label}


def producer_args(arm, kd_cfg, store):
    args = ["-m", "megatron_ddk.cli", "cache-teacher", "--config", kd_cfg, "--out", store,
            "--top-k", str(arm["k"]), "--cover-runs", kd_cfg]
    if arm["fmt"] == 1:
        return args + ["--store-format", "1", "--logprob-dtype", arm["codec"]]
    return args + ["--store-format", "2", "--top-p", str(arm["top_p"]), "--logprob-codec",
                   arm["codec"], "--compression", arm["compression"], "--id-codec",
                   arm.get("id_codec") or "packed", "--tail-samples",
                   str(arm.get("tail_samples", 0))]


def end_record(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if r["kind"] == "end"][-1]


def test_ppl(path):
    with open(path) as f:
        res = json.load(f)["domains"]
    tokens = sum(r["tokens"] for r in res.values())
    return math.exp(sum(r["loss"] * r["tokens"] for r in res.values()) / tokens)


def run_arm(arm, pipe, work, samples):
    """Producer, KD arm on its store, test-split evaluation."""
    name = arm["label"].replace(" ", "_").replace("=", "")
    store, run_dir = os.path.join(work, "stores", name), os.path.join(work, "arms", name)
    kd_cfg = os.path.join(pipe, "configs", "KD_seed1234.yaml")
    os.makedirs(os.path.dirname(store), exist_ok=True)
    os.makedirs(run_dir, exist_ok=True)
    header, p_wall, p_cpu, source = {}, 0.0, 0.0, []
    if arm["fmt"]:
        print(f"  {arm['label']}: producer ...", flush=True)
        p_wall, p_cpu = sh(producer_args(arm, kd_cfg, store),
                           os.path.join(work, f"{name}.store.log"))
        with open(os.path.join(store, "header.json")) as f:
            header = json.load(f)
        source = [f"distill.teacher_logits={store}"]
    print(f"  {arm['label']}: KD arm ...", flush=True)
    wall, cpu = sh(["-m", "megatron_ddk.train", "--config", kd_cfg, *source,
                    f"logging.run_dir={run_dir}", f"checkpoint.save={run_dir}/ckpt"],
                   os.path.join(run_dir, "train.out"))
    end = end_record(run_dir)
    t = end["timing"]
    step = sum(t.get(k, 0.0) for k in ("student_forward_backward", "teacher_forward",
                                       "teacher_cache_read", "optimizer"))
    out = os.path.join(run_dir, "eval.json")
    sh(["-m", "megatron_ddk.cli", "eval", "--config",
        os.path.join(pipe, "configs", "eval_KD_seed1234.yaml"), "--load", f"{run_dir}/ckpt",
        "--split", "test", "--samples", str(samples), "--output", out],
       os.path.join(run_dir, "eval.log"))
    return dict(arm, producer_wall_s=p_wall, producer_cpu_s=p_cpu, loop_s=end["elapsed_s"] -
                t.get("checkpoint", 0.0), cpu_s=cpu, process_wall_s=wall, timing=t,
                read_share=t.get("teacher_cache_read", 0.0) / step if step else 0.0,
                store_bytes_per_token=header.get("measured_bytes_per_token", 0.0),
                entries_per_token=header.get("entries_per_token"), ppl=test_ppl(out),
                steps=end["step"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default=os.path.join(ROOT, "runs", "quickstart"),
                   help="a finished quickstart pipeline folder (data, teacher, student, configs)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_offline_teacher"))
    p.add_argument("--ks", default="16,20,24,32")
    p.add_argument("--top-ps", default="1,0.95")
    p.add_argument("--codecs", default="float16,q8,q4")
    p.add_argument("--id-codecs", default="packed,ef")
    p.add_argument("--grid-samples", type=int, default=32, help="validation samples per domain")
    p.add_argument("--arms", default="v1:32:1:float16,v2:24:1:q4:ef,v2:16:1:q4:ef:t8,"
                                     "v2:8:1:q4:ef:t16",
                   help="store settings trained as KD arms (the first is the baseline)")
    p.add_argument("--default", default="v2:16:1:q4:ef:t8",
                   help="the setting checked for acceptance")
    p.add_argument("--skip-grid", action="store_true", help="reuse <workdir>/grid.json")
    p.add_argument("--reuse-arms", action="store_true",
                   help="take the arms already in <workdir>/bench_offline_teacher.json (their "
                        "runs are deterministic) and run only the new ones")
    p.add_argument("--report-only", action="store_true",
                   help="print the tables of <workdir>/grid.json and the arms of "
                        "<workdir>/bench_offline_teacher.json (no runs)")
    args = p.parse_args(argv)
    if args.report_only:
        with open(os.path.join(os.path.abspath(args.workdir), "bench_offline_teacher.json")) as f:
            result = json.load(f)
        with open(os.path.join(os.path.abspath(args.workdir), "grid.json")) as f:
            result["grid"] = json.load(f)
        report(result, parse_arm(args.default)["label"])
        return
    pipe, work = os.path.abspath(args.pipeline), os.path.abspath(args.workdir)
    kd_cfg = os.path.join(pipe, "configs", "KD_seed1234.yaml")
    if not os.path.isfile(kd_cfg):
        raise SystemExit(f"{kd_cfg} not found: run the quickstart pipeline first "
                         f"(megatron-ddk pipeline --config "
                         f"megatron_ddk/examples/quickstart/pipeline.yaml)")
    os.makedirs(work, exist_ok=True)
    grid_path = os.path.join(work, "grid.json")
    print(f"load at start: {os.getloadavg()}", flush=True)
    if not args.skip_grid:
        print("grid (bench/offline_teacher_kl.py) ...", flush=True)
        sh([os.path.join(ROOT, "bench", "offline_teacher_kl.py"), "--config", kd_cfg,
            "--student", os.path.join(pipe, "runs", "student", "ckpt"), "--ks", args.ks,
            "--top-ps", args.top_ps, "--codecs", args.codecs, "--id-codecs", args.id_codecs,
            "--samples",
            str(args.grid_samples), "--out", grid_path], os.path.join(work, "grid.log"))
    with open(grid_path) as f:
        grid = json.load(f)
    old = {}
    if args.reuse_arms and os.path.isfile(os.path.join(work, "bench_offline_teacher.json")):
        with open(os.path.join(work, "bench_offline_teacher.json")) as f:
            old = {a["label"]: a for a in json.load(f)["arms"]}
    arms = []
    for text in args.arms.split(","):
        arm = parse_arm(text)
        if arm["label"] in old:
            print(f"  {arm['label']}: reused from the previous run", flush=True)
            arms.append(dict(old[arm["label"]], reused=True))
        else:
            arms.append(run_arm(arm, pipe, work, 64))
    print(f"load at end: {os.getloadavg()}", flush=True)
    with open(os.path.join(pipe, "eval", "KD_seed1234.json")):
        online_ppl = test_ppl(os.path.join(pipe, "eval", "KD_seed1234.json"))
    result = {"grid": grid, "arms": arms, "online_kd_ppl": online_ppl, "args": vars(args)}
    report(result, parse_arm(args.default)["label"])
    with open(os.path.join(work, "bench_offline_teacher.json"), "w") as f:
        json.dump(result, f, indent=1)


def projected(row):
    """Uncompressed bytes per token at Qwen-1.5's vocabulary from the measured entries (ef: the
    most its ids can take there whatever they are)."""
    from megatron_ddk.data.store_codec import bytes_per_token as v2_bytes
    from megatron_ddk.data.teacher_store import bytes_per_token as v1_bytes

    if row["format"] == 1:
        return float(v1_bytes(row["top_k"], QWEN15_VOCAB, "float16"))
    return v2_bytes(row["entries_per_token"], QWEN15_VOCAB, row["codec"], row["top_k"],
                    row["top_p"], row.get("id_codec") or "packed", row.get("tail_samples", 0))


def report(result, default_label):
    from megatron_ddk.data.teacher_store import bytes_per_token as v1_bytes

    grid, arms = result["grid"], result["arms"]
    base = arms[0]
    step_s = base["loop_s"] / base["steps"]
    step_tokens = 8 * 256  # the KD arm's global batch x seq_length
    ref152 = v1_bytes(32, QWEN15_VOCAB, "float16")
    print(f"\ngrid: {grid['tokens']} held-out tokens, dense teacher-student KL "
          f"{grid['mean_kl']:.4f} nats/token, vocabulary {grid['vocab']}; one step = "
          f"{step_tokens} tokens in {step_s:.3f} s (the baseline KD arm)\n")
    print(f"{'setting':<26} {'entries':>7} {'B/tok':>7} {'B/tok zstd':>10} {'B/tok 152k':>10} "
          f"{'x v1 K32':>8} {'KL err':>8} {'p99':>7} {'mean KL err':>11} {'cold tok/s':>11} "
          f"{'warm tok/s':>11} {'read % step':>11}")
    for row in grid["rows"]:
        st = row["stores"]
        b152 = projected(row)
        cold = st["none"]["read_cold_tokens_per_s"]
        print(f"{row['label']:<26} {row['entries_per_token']:>7.2f} "
              f"{st['none']['bytes_per_token']:>7.1f} "
              f"{st['zstd']['bytes_per_token'] if 'zstd' in st else float('nan'):>10.1f} "
              f"{b152:>10.1f} {b152 / ref152:>8.3f} {row['kl_err_mean']:>8.4f} "
              f"{row['kl_err_p99']:>7.3f} {100 * row['kl_of_mean_rel']:>10.2f}% {cold:>11.0f} "
              f"{st['none']['read_warm_tokens_per_s']:>11.0f} "
              f"{100 * step_tokens / cold / step_s:>10.2f}%")
    print(f"\n{'KD arm on store':<30} {'entries':>7} {'B/tok':>7} {'B/tok 152k':>10} "
          f"{'producer s':>10} {'loop s':>7} {'read % step':>11} {'test ppl':>9} "
          f"{'vs v1 K32':>9} {'vs online':>9}")
    for a in arms:
        entries = a.get("entries_per_token") or a["k"]
        b152 = projected({"format": a["fmt"], "top_k": a["k"], "top_p": a["top_p"],
                          "codec": a["codec"], "entries_per_token": entries,
                          "id_codec": a.get("id_codec"),
                          "tail_samples": a.get("tail_samples", 0)}) if a["fmt"] else float("nan")
        print(f"{a['label']:<30} {entries:>7.2f} "
              f"{a['store_bytes_per_token']:>7.1f} {b152:>10.1f} {a['producer_wall_s']:>10.1f} "
              f"{a['loop_s']:>7.1f} {100 * a['read_share']:>10.2f}% {a['ppl']:>9.3f} "
              f"{100 * (a['ppl'] / base['ppl'] - 1):>+8.3f}% "
              f"{100 * (a['ppl'] / result['online_kd_ppl'] - 1):>+8.3f}%")
    print(f"(KD online, the pipeline's KD@1234: test ppl {result['online_kd_ppl']:.3f})")
    row = next((r for r in grid["rows"] if r["label"] == default_label.replace(" none", "")),
               None)
    arm = next((a for a in arms if a["label"] == default_label), None)
    print(f"\nacceptance (default {default_label}):")
    if row is None and arm is not None:  # a setting outside the grid (tail samples): its arm
        row = {"format": arm["fmt"], "top_k": arm["k"], "top_p": arm["top_p"],
               "codec": arm["codec"], "entries_per_token": arm.get("entries_per_token") or
               arm["k"], "id_codec": arm.get("id_codec"),
               "tail_samples": arm.get("tail_samples", 0)}
    if row is not None:
        b152 = projected(row)
        print(f"  bytes/token at 152k vocabulary: {b152:.1f} from {row['entries_per_token']:.2f} "
              f"measured entries/token = {b152 / ref152:.3f} of format 1 K=32 ({ref152} B) "
              f"(target <= 0.333)")
    if arm is not None:
        print(f"  KD test ppl {arm['ppl']:.3f} vs format-1 float16 K=32 {base['ppl']:.3f}: "
              f"{100 * (arm['ppl'] / base['ppl'] - 1):+.3f}% (target: within 0.3%, or below); "
              f"vs online KD {result['online_kd_ppl']:.3f}: "
              f"{100 * (arm['ppl'] / result['online_kd_ppl'] - 1):+.3f}%")
        print(f"  store reads: {100 * arm['read_share']:.2f}% of the KD step (trainer's "
              f"teacher_cache_read; target <= 5%)")


if __name__ == "__main__":
    main()
