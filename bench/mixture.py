"""Benchmark: DDK's per-interval index against rebuilding a Megatron-Core blend, on CPU.

    .venv/bin/python bench/mixture.py            # 20-40 s; prints a markdown table

The paper re-weights 10 domains every K = 1000 steps at global batch 128: each interval draws
128,000 samples. Two ways to serve that on Megatron-Core:

- DDK (megatron_ddk.data.mixture.IntervalMixture): per-domain GPTDatasets are built once; each
  interval builds only its own index (largest-remainder counts, ids from per-domain cursors, one
  permutation). Its cost does not grow with the run.
- Megatron-Core: BlendedDataset's weights are fixed at build time and its cache key includes them,
  so new weights mean a fresh BlendedMegatronDatasetBuilder build of a run-sized blend
  (run_intervals x 128,000 samples): per-domain GPTDataset indices sized from the weights plus
  the blending index, written to a fresh cache folder (as in a real run with a data cache).

Both read the same synthetic indexed datasets (10 domains of random token ids, written to a
temp dir with IndexedDatasetBuilder) and the same random DDK-like weights (every domain >= 5%).
Times are medians over --repeats; the DDK column at 30 intervals is the mean interval of a whole
30-interval run.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from megatron_ddk.data.domain_datasets import build_domain_datasets  # noqa: E402
from megatron_ddk.data.manifest import DomainEntry, DomainManifest  # noqa: E402
from megatron_ddk.data.mixture import IntervalMixture  # noqa: E402


class BenchTokenizer:
    """The fields GPTDataset reads from a tokenizer."""

    vocab_size = 32000
    eod = 0
    pad = 1
    unique_identifiers = {"class": "BenchTokenizer", "vocab_size": 32000}


def write_domains(folder: str, num_domains: int, seq_length: int, rng) -> DomainManifest:
    """Domains of 20k..80k samples each, documents of 200..4000 random tokens."""
    domains = []
    for d in range(num_domains):
        tokens_wanted = int(rng.integers(20_000, 80_000)) * seq_length
        prefix = os.path.join(folder, f"domain{d}")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        total = docs = 0
        while total < tokens_wanted:
            doc = rng.integers(2, 32000, size=int(rng.integers(200, 4000)), dtype=np.uint16)
            builder.add_document(doc, [doc.size])
            total, docs = total + doc.size, docs + 1
        builder.finalize(prefix + ".idx")
        domains.append(DomainEntry(f"domain{d}", [prefix], prefix, total, docs, total, docs))
    return DomainManifest("", "", "sha256:0", BenchTokenizer.vocab_size, domains)


def ddk_weights(rng, num_domains: int, num_intervals: int):
    """DDK-like mixtures: alpha * (a random distribution) + (1 - alpha) / N, alpha = 0.5."""
    return [0.5 * rng.dirichlet(np.full(num_domains, 0.5)) + 0.5 / num_domains
            for _ in range(num_intervals)]


def time_ddk(sizes, weights, args) -> tuple:
    """(seconds for interval 0's index, mean seconds per interval over the whole run)."""
    firsts, means = [], []
    for rep in range(args.repeats):
        mix = IntervalMixture(sizes, args.global_batch_size, args.interval, seed=rep)
        times = []
        for w in weights:
            t0 = time.perf_counter()
            mix.start_interval(w)
            times.append(time.perf_counter() - t0)
            mix.advance(args.interval)
        firsts.append(times[0])
        means.append(sum(times) / len(times))
    return statistics.median(firsts), statistics.median(means)


def time_megatron(manifest, weights, run_samples: int, args, workdir: str) -> float:
    """Median seconds of a fresh BlendedMegatronDatasetBuilder build of a run-sized blend."""
    prefixes = [d.train_prefixes[0] for d in manifest.domains]
    times = []
    for rep in range(args.repeats):
        cfg = GPTDatasetConfig(
            random_seed=rep, sequence_length=args.seq_length,
            blend=(prefixes, [float(x) for x in weights[rep % len(weights)]]), split="1,0,0",
            path_to_cache=tempfile.mkdtemp(dir=workdir), tokenizer=BenchTokenizer(),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False)
        t0 = time.perf_counter()
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [run_samples, 0, 0],
                                                    lambda: True, cfg).build()
        times.append(time.perf_counter() - t0)
        assert len(train) >= run_samples
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=int, default=10)
    p.add_argument("--interval", type=int, default=1000, help="K steps")
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=64, help="tokens per sample (small: the "
                   "index cost depends on samples, the data written on tokens)")
    p.add_argument("--run-intervals", type=int, nargs="+", default=[1, 30])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)  # path_to_cache needs it
    rng = np.random.default_rng(0)
    per_interval = args.interval * args.global_batch_size
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        manifest = write_domains(workdir, args.domains, args.seq_length, rng)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        datasets = build_domain_datasets(manifest, BenchTokenizer(), args.seq_length, 0,
                                         os.path.join(workdir, "ddk_cache"), 1)
        t_once = time.perf_counter() - t0
        sizes = datasets.num_train_samples
        rows = []
        for n_int in args.run_intervals:
            weights = ddk_weights(rng, args.domains, n_int)
            first, mean = time_ddk(sizes, weights, args)
            ddk_s = first if n_int == 1 else mean
            mc_s = time_megatron(manifest, weights, n_int * per_interval, args, workdir)
            rows.append((n_int, n_int * per_interval, ddk_s, mc_s))
    torch.distributed.destroy_process_group()
    print(f"{args.domains} domains ({sum(sizes):,} samples of {args.seq_length} tokens in one "
          f"epoch, written in {t_write:.1f} s), interval = {args.interval} x "
          f"{args.global_batch_size} = {per_interval:,} samples; median of {args.repeats}.\n")
    print("| run length | samples in run | DDK: one interval's index | Megatron-Core: rebuild "
          "run-sized blend | ratio (MC / DDK) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n_int, samples, ddk_s, mc_s in rows:
        print(f"| {n_int} interval{'s' if n_int > 1 else ''} | {samples:,} | "
              f"{1e3 * ddk_s:.1f} ms | {1e3 * mc_s:.1f} ms | {mc_s / ddk_s:.1f}x |")
    print(f"\nDDK's one-off cost: building the {args.domains} one-epoch GPTDatasets took "
          f"{1e3 * t_once:.0f} ms (once per run). Re-weighting every interval of a "
          f"{rows[-1][0]}-interval run costs {rows[-1][0]} x the DDK column with DDK and "
          f"{rows[-1][0]} x the Megatron-Core column with rebuilds.")


if __name__ == "__main__":
    main()
