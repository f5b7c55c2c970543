"""Benchmark: preprocessing throughput (tokens/s) on the demo corpus.

Compares, in one run and on the same files:
  plain loop   single process: read line, json.loads, SentencePiece encode, IndexedDatasetBuilder
  workers=1    megatron_ddk.data.preprocess.tokenize_to_datasets, in-process
  workers=2    the same with 2 tokenizer processes
Each is run --repeats times per domain file; the best total wall time is reported (one-off imports
excluded), with the CPU seconds of all processes (on a busy shared machine wall time is noisy;
CPU time shows the work done). All three must write identical bytes; the bench checks that too. Prints a markdown
table with ratios against the plain loop.

    python bench/preprocess.py       # builds the demo corpus + tokenizer in a temp folder
    python bench/preprocess.py --corpus data/demo/corpus \\
        --tokenizer-model data/demo/tokenizer/ddk.model
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tools"))

import argparse  # noqa: E402
import filecmp  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, List, Optional  # noqa: E402

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def plain_loop(path: str, prefix: str, model: str) -> int:
    """The baseline: the simplest correct single-process tokenize-and-write loop."""
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    builder = IndexedDatasetBuilder(prefix + ".bin",
                                    dtype=DType.optimal_dtype(sp.get_piece_size()))
    num_tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if not text:
                continue
            ids = sp.encode(text) + [sp.eos_id()]
            builder.add_document(np.array(ids, dtype=np.int32), [len(ids)])
            num_tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return num_tokens


def _ours(workers: int) -> Callable[[str, str, str], int]:
    def run(path: str, prefix: str, model: str) -> int:
        from megatron_ddk.data.preprocess import tokenize_to_datasets

        res = tokenize_to_datasets([path], {"text": prefix}, model, workers=workers)
        return res.num_tokens["text"]
    return run


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(fn, files: List[str], out: str, model: str, repeats: int):
    """Best-of-repeats wall time over all files; returns (seconds, cpu seconds, tokens)."""
    best, cpu, tokens = float("inf"), float("inf"), 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        tokens = sum(fn(p, os.path.join(out, os.path.basename(p)), model) for p in files)
        best = min(best, time.perf_counter() - start)
        cpu = min(cpu, _cpu_seconds() - start_cpu)
    return best, cpu, tokens


def _prepare(args, tmp: str):
    """The corpus folder and tokenizer to use (built in tmp when not given)."""
    corpus, model = args.corpus, args.tokenizer_model
    if corpus is None:
        from build_demo_corpus import build_demo_corpus

        corpus = os.path.join(tmp, "corpus")
        build_demo_corpus(corpus, max_mb=args.max_mb, progress=False)
    if model is None:
        from megatron_ddk.data.corpus import discover_domains
        from megatron_ddk.data.tokenizer import parse_shares, sample_domains, train_sentencepiece

        domains = discover_domains(corpus)
        shares = parse_shares(None, [d.name for d in domains])
        model = train_sentencepiece(sample_domains(domains, shares, int(32e6)),
                                    os.path.join(tmp, "tok", "ddk"), vocab_size=8000)
    return corpus, model


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="folder of <domain>.jsonl (default: build demo)")
    p.add_argument("--tokenizer-model", default=None, help="default: train one on the corpus")
    p.add_argument("--max-mb", type=float, default=1.5, help="demo corpus size per domain")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from megatron_ddk.data.corpus import discover_domains
    from megatron_ddk.data.preprocess import tokenize_to_datasets  # noqa: F401 (warm imports)
    from megatron_ddk.data.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus, model = _prepare(args, tmp)
        build_tokenizer(model)  # warm the one-off megatron.core / transformers imports
        files = [path for d in discover_domains(corpus) for path in d.paths]
        methods = {"plain loop (1 process)": plain_loop, "tokenize_to_datasets workers=1":
                   _ours(1), "tokenize_to_datasets workers=2": _ours(2)}
        rows, outs = [], []
        for i, (name, fn) in enumerate(methods.items()):
            out = os.path.join(tmp, f"out{i}")
            os.makedirs(out)
            seconds, cpu, tokens = _timed(fn, files, out, model, args.repeats)
            rows.append((name, seconds, cpu, tokens))
            outs.append(out)
        identical = all(
            filecmp.cmp(os.path.join(outs[0], os.path.basename(f) + s),
                        os.path.join(o, os.path.basename(f) + s), shallow=False)
            for o in outs[1:] for f in files for s in (".bin", ".idx"))
    base = rows[0][3] / rows[0][1]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"corpus: {len(files)} domain files, {rows[0][3]:,} tokens; cpus: {os.cpu_count()}; "
          f"load average: {load}; best of {args.repeats}; outputs byte-identical: {identical}\n")
    print("| method | wall s | CPU s (all processes) | tokens/s (wall) | ratio vs plain |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, cpu, tokens in rows:
        rate = tokens / seconds
        print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {rate:,.0f} | {rate / base:.2f}x |")
    if not identical:
        sys.exit("error: outputs differ between methods")


if __name__ == "__main__":
    main()
