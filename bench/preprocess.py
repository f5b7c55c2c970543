"""Benchmark: end-to-end preprocessing wall time (tools/preprocess_data.py) against a plain loop
and, when a checkout is given, Megatron-LM's own tools/preprocess_data.py.

Corpus (built once in --work-dir): every .py file of this Python's standard library
(sysconfig's stdlib path, site-packages excluded, sorted by path) as one JSONL document
{"text": <file content>}. Tokenizer: SentencePiece 32k BPE with byte fallback (megatron_ddk's
lossless train_sentencepiece defaults) trained on a 10 MB sample of that corpus
(corpus.sample_domain_text, seed 1234). Every method runs as its own process, timed from start to
exit (start-up and imports included), with the same flags:
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model <model> --append-eod --workers W
  plain loop      one process: json.loads, SentencePiece encode, Megatron-Core's
                  IndexedDatasetBuilder.add_document (the reference for the ratios)
  ours W          tools/preprocess_data.py --workers W
  Megatron-LM W   <checkout>/tools/preprocess_data.py --workers W (optional)
Each repeat runs all methods back to back; the table gives the median and the best wall time of
--repeats, the median CPU seconds of each process tree (less sensitive to a busy machine), the
ratios against the plain loop and against Megatron-LM with the same workers, and the encode
floor measured in this process: SentencePiece on all documents as one batch with 1 and 2
threads, and the JSON parsing. All outputs must be byte-identical (checked). The load average is
printed: on a shared machine the numbers are only comparable within one run.

    python bench/preprocess.py
    git --git-dir <mirror> archive core_v0.16.1 tools megatron | tar -x -C /tmp/mlm
    python bench/preprocess.py --megatron-lm /tmp/mlm --repeats 3

Megatron-LM's tool is started with PYTHONPATH=<checkout> and one stand-in module:
megatron.training imports megatron.core...batch_invariant_kernels, which imports triton at import
time (absent on CPU-only machines); preprocessing never calls it.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import filecmp  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

_MLM_RUNNER = (
    "import runpy, sys, types\n"
    "name = 'megatron.core.transformer.custom_layers.batch_invariant_kernels'\n"
    "stub = types.ModuleType(name)\n"
    "stub.enable_batch_invariant_mode = lambda *a, **k: None\n"
    "sys.modules[name] = stub\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def plain_loop(path: str, prefix: str, model: str) -> None:
    """The baseline: the simplest correct single-process loop with Megatron-LM's semantics."""
    import numpy as np
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    builder = IndexedDatasetBuilder(prefix + ".bin",
                                    dtype=DType.optimal_dtype(sp.get_piece_size()))
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"])
            lengths = [len(ids) + 1] if ids else []
            builder.add_document(np.array(ids + [sp.eos_id()] if ids else [], dtype=np.int32),
                                 lengths)
    builder.finalize(prefix + ".idx")


def build_corpus(work: str) -> str:
    """<work>/stdlib.jsonl: every stdlib .py file (sorted, site-packages excluded), one doc each."""
    import glob
    import sysconfig

    out = os.path.join(work, "stdlib.jsonl")
    if os.path.exists(out):
        return out
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(p for p in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                   if "site-packages" not in p.split(os.sep))
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for path in files:
            try:
                with open(path, encoding="utf-8") as src:
                    f.write(json.dumps({"text": src.read()}) + "\n")
            except (UnicodeDecodeError, OSError):
                continue  # a few test files are not UTF-8 on purpose
    os.replace(out + ".tmp", out)
    return out


def build_tokenizer(work: str, corpus: str) -> str:
    """<work>/tok/sp32k.model: 32k lossless BPE trained on a 10 MB sample of the corpus."""
    model = os.path.join(work, "tok", "sp32k.model")
    if not os.path.exists(model):
        from megatron_ddk.data.preprocessing.corpus import sample_domain_text
        from megatron_ddk.data.tokenizer import train_sentencepiece

        lines = sample_domain_text([corpus], 10_000_000, seed=1234)
        train_sentencepiece(lines, model[:-len(".model")], vocab_size=32000)
    return model


def measure_floor(corpus: str, model: str) -> Dict[str, float]:
    """Seconds for JSON parsing and for SentencePiece encoding all texts in one batch."""
    import sentencepiece

    with open(corpus, "rb") as f:
        raws = f.readlines()
    start = time.perf_counter()
    texts = [json.loads(r)["text"] for r in raws]
    floor = {"json": time.perf_counter() - start}
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    for threads in (1, 2):
        start = time.perf_counter()
        ids = sp.encode(texts, num_threads=threads)
        floor[f"encode{threads}"] = time.perf_counter() - start
    floor["tokens"] = sum(len(x) + 1 for x in ids if x)
    return floor


def _commands(args, corpus: str, model: str, out: str) -> Dict[str, tuple]:
    """name -> (argv, env, output prefix)."""
    flags = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model,
             "--append-eod"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    prefix = os.path.join(out, "plain")
    cmds = {"plain loop (1 process)": (
        [sys.executable, os.path.abspath(__file__), "--plain-loop", corpus, prefix, model], env,
        prefix)}
    for w in args.workers:
        p = os.path.join(out, f"ours{w}")
        cmds[f"ours, --workers {w}"] = (
            [sys.executable, os.path.join(_ROOT, "tools", "preprocess_data.py"), "--input",
             corpus, "--output-prefix", p, "--workers", str(w)] + flags, env,
            p + "_text_document")
    if args.megatron_lm:
        mlm_env = dict(env, PYTHONPATH=os.path.abspath(args.megatron_lm))
        tool = os.path.join(os.path.abspath(args.megatron_lm), "tools", "preprocess_data.py")
        for w in args.workers:
            p = os.path.join(out, f"mlm{w}")
            cmds[f"Megatron-LM, --workers {w}"] = (
                [sys.executable, "-c", _MLM_RUNNER, tool, "--input", corpus, "--output-prefix",
                 p, "--workers", str(w)] + flags, mlm_env, p + "_text_document")
    return cmds


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv, env) -> Tuple[float, float]:
    """(wall seconds, CPU seconds of the process and the workers it reaped)."""
    start, start_cpu = time.perf_counter(), _children_cpu()
    res = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"error: {argv[:3]} failed:\n{res.stderr[-3000:]}")
    return seconds, _children_cpu() - start_cpu


def _table(times: Dict[str, List[float]], cpu: Dict[str, List[float]], tokens: int,
           floor: Dict[str, float]) -> None:
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med["plain loop (1 process)"]
    print("| method | median s | best s | CPU s (median) | tokens/s (median) | vs plain loop | "
          "vs Megatron-LM |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in times.items():
        workers = name.rsplit(" ", 1)[-1] if "--workers" in name else None
        mlm = med.get(f"Megatron-LM, --workers {workers}")
        vs_mlm = f"{mlm / med[name]:.2f}x" if mlm and not name.startswith("Megatron") else ""
        print(f"| {name} | {med[name]:.2f} | {min(t):.2f} | {statistics.median(cpu[name]):.2f} | "
              f"{tokens / med[name]:,.0f} | "
              f"{base / med[name]:.2f}x | {vs_mlm} |")
    print(f"\nfloor (this process): SentencePiece encode of all documents as one batch "
          f"{floor['encode1']:.2f}s on 1 thread, {floor['encode2']:.2f}s on 2 threads; JSON "
          f"parsing {floor['json']:.2f}s")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/megatron_ddk_bench_preprocess",
                   help="corpus, tokenizer (kept between runs) and outputs")
    p.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout (tools + megatron)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plain-loop", nargs=3, metavar=("INPUT", "PREFIX", "MODEL"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_loop:
        plain_loop(*args.plain_loop)
        return
    os.makedirs(args.work_dir, exist_ok=True)
    corpus = build_corpus(args.work_dir)
    model = build_tokenizer(args.work_dir, corpus)
    out = os.path.join(args.work_dir, "out")
    os.makedirs(out, exist_ok=True)
    load_before = os.getloadavg()
    cmds = _commands(args, corpus, model, out)
    times: Dict[str, List[float]] = {name: [] for name in cmds}
    cpu: Dict[str, List[float]] = {name: [] for name in cmds}
    floor = measure_floor(corpus, model)
    for _ in range(args.repeats):
        for name, (cmd, env, _prefix) in cmds.items():
            wall, cpu_seconds = _run(cmd, env)
            times[name].append(wall)
            cpu[name].append(cpu_seconds)
    prefixes = [c[2] for c in cmds.values()]
    identical = all(filecmp.cmp(prefixes[0] + s, q + s, shallow=False)
                    for q in prefixes[1:] for s in (".bin", ".idx"))
    load = ", ".join(f"{x:.1f}" for x in load_before + os.getloadavg())
    mb = os.path.getsize(corpus) / 2**20
    print(f"corpus: {corpus} ({mb:.1f} MB, {floor['tokens']:,} tokens); cpus: {os.cpu_count()}; "
          f"repeats: {args.repeats}; load average (1/5/15 min) before, after: {load}; outputs "
          f"byte-identical: {identical}\n")
    _table(times, cpu, floor["tokens"], floor)
    if not identical:
        sys.exit("error: outputs differ between methods")


if __name__ == "__main__":
    main()
