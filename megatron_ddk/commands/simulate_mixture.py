"""Simulate the DDK interval mixture: how much of each domain a run consumes, and what repeats.

Runs the real IntervalMixture (and, for --synthetic, the real DDKController) without a model, so
the numbers are exactly those a training run with the same weights would see. Two sources of
weights:

  --weights FILE   a recorded history: a run's metrics.jsonl (its {"kind": "interval"} records,
                   one per interval, in interval order; step records are skipped), or a
                   YAML/JSON list of weight vectors (a list in domain order or a {domain: weight}
                   mapping each). When the run needs more intervals than the file holds, the
                   last vector is repeated.
  --synthetic      student losses that decay toward the teacher's at a different rate per domain:
                   loss_S[i] = loss_T[i] + gap[i] * exp(-rate[i] * samples_seen[i] / interval_size)
                   and the policy (--policy) picks each interval's weights from them.

Domains come from --manifest (exact samples per epoch from the .idx files) or --domains
name=samples,... Prints one row per interval (weight and cumulative epochs per domain), the
epochs each domain starts (repeats), and totals.

    megatron-ddk simulate-mixture --manifest data/demo/datasets/manifest.yaml --synthetic \\
        --policy ddk --steps 3000 --interval 100 --global-batch-size 16 --seq-length 256
    megatron-ddk simulate-mixture --domains web=50000,code=8000,math=2000 \\
        --weights runs/x/metrics.jsonl --steps 20000 --interval 1000 --global-batch-size 128
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from typing import List, Optional, Sequence

import numpy as np
import yaml

from megatron_ddk.config.schema import DDKConfig
from megatron_ddk.console import results
from megatron_ddk.data.mixture import IntervalMixture
from megatron_ddk.ddk import DDKController


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="domain manifest YAML (`megatron-ddk build-domains`)")
    src.add_argument("--domains", help="name=samples_per_epoch,... instead of a manifest")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--weights", help="recorded weight history (metrics.jsonl, YAML or JSON)")
    how.add_argument("--synthetic", action="store_true",
                     help="synthetic loss trajectories driven through --policy")
    p.add_argument("--policy", default="ddk",
                   choices=["ddk", "ddk_no_smoothing", "equal", "static"])
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to simulate")
    p.add_argument("--interval", type=int, default=1000, help="K, steps per interval")
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sample")
    p.add_argument("--seed", type=int, default=1234, help="run seed (mixture shuffles)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--initial-sampling", default="natural",
                   choices=["natural", "uniform", "eq1", "manifest"],
                   help="interval 0's mixture (ddk.initial_sampling); r_0 is Eq. 1 regardless")
    p.add_argument("--static-weights", help="comma list for --policy static")
    p.add_argument("--weight-floor", type=float)
    p.add_argument("--weight-cap", type=float)
    p.add_argument("--max-epochs-per-domain", type=float)
    p.add_argument("--synthetic-rates", help="comma list of per-domain decay rates "
                   "(per interval's worth of the domain's samples); default: seeded random")
    p.add_argument("--synthetic-gaps", help="comma list of initial loss gaps (nats)")
    p.add_argument("--synthetic-seed", type=int, default=0)
    return p.parse_args(argv)


def _floats(text: Optional[str], n: int, what: str) -> Optional[np.ndarray]:
    if text is None:
        return None
    vals = [float(x) for x in text.split(",")]
    if len(vals) != n:
        raise ValueError(f"{what}: {len(vals)} values for {n} domains")
    return np.array(vals)


def load_domains(args):
    """(names, samples per epoch, natural weights, manifest initial weights)."""
    if args.domains:
        pairs = [item.split("=") for item in args.domains.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--domains {args.domains!r}: expected name=samples,...")
        sizes = np.array([int(b) for _, b in pairs])
        return [a for a, _ in pairs], sizes, sizes / sizes.sum(), None
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ddk.data.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    sizes = []
    for d in manifest.domains:
        samples = 0
        for prefix in d.train_prefixes:
            ds = IndexedDataset(prefix, mmap=True)  # keep it alive while its mmap is read
            samples += max(0, (int(np.sum(ds.sequence_lengths, dtype=np.int64)) - 1)
                           // args.seq_length)
            del ds
        sizes.append(samples)
    return (manifest.names(), np.array(sizes), manifest.natural_weights(),
            [d.initial_weight for d in manifest.domains])


def _interval_records(path: str, text: str) -> List:
    """Weight entries of a metrics.jsonl: its interval records only ({"kind": "interval"};
    step and end records carry weights too, but are not intervals), in interval order, the
    last record of an interval kept (a resumed run logs its boundary interval again)."""
    by_interval = {}
    for num, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if num == len(text.splitlines()):
                continue  # a last line still being written
            raise ValueError(f"{path}:{num}: not a valid JSON line") from None
        if rec.get("kind", rec.get("type")) != "interval" or "weights" not in rec:
            continue
        key = rec.get("interval", len(by_interval))
        w = rec["weights"]
        if rec.get("domains") and isinstance(w, list):
            w = dict(zip(rec["domains"], w))  # named: checked against the domains below
        by_interval[key] = w
    if not by_interval:
        raise ValueError(f"{path}: no interval records ({{\"kind\": \"interval\"}}); pass a "
                         "run's metrics.jsonl, or a YAML/JSON list of weight vectors")
    return [by_interval[k] for k in sorted(by_interval)]


def load_history(path: str, names: List[str]) -> List[np.ndarray]:
    """Weight vectors from a metrics.jsonl's interval records or a YAML/JSON list."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    if isinstance(doc, dict) and "weights" in doc and "kind" not in doc and "type" not in doc:
        doc = doc["weights"]
    records = doc if isinstance(doc, list) else _interval_records(path, text)
    out = []
    for i, w in enumerate(records):
        if isinstance(w, dict) and "weights" in w:
            w = w["weights"]
        if isinstance(w, dict):
            missing = [n for n in names if n not in w]
            if missing:
                raise ValueError(f"{path}: record {i} has no weight for domain(s) {missing} "
                                 f"(it names {sorted(w)})")
            w = [w[n] for n in names]
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (len(names),):
            raise ValueError(f"{path}: record {i} has {w.size} weights for {len(names)} domains")
        out.append(w)
    if not out:
        raise ValueError(f"{path}: no weight vectors found")
    return out


class SyntheticLosses:
    """loss_S[i] = loss_T[i] + gap[i] * exp(-rate[i] * seen[i] / interval_samples)."""

    def __init__(self, n: int, args, interval_samples: int) -> None:
        rng = np.random.default_rng(args.synthetic_seed)
        self.teacher = rng.uniform(1.5, 3.0, n)
        self.gaps = _floats(args.synthetic_gaps, n, "--synthetic-gaps")
        self.gaps = rng.uniform(0.5, 2.0, n) if self.gaps is None else self.gaps
        self.rates = _floats(args.synthetic_rates, n, "--synthetic-rates")
        self.rates = np.exp(rng.uniform(np.log(0.5), np.log(20.0), n)) if self.rates is None \
            else self.rates
        self.interval_samples = interval_samples

    def student(self, seen: np.ndarray) -> np.ndarray:
        return self.teacher + self.gaps * np.exp(-self.rates * seen / self.interval_samples)


def simulate(args) -> None:
    names, sizes, natural, manifest_w = load_domains(args)
    n, k, gbs = len(names), args.interval, args.global_batch_size
    mix = IntervalMixture(sizes, gbs, k, args.seed, names)
    num_intervals = math.ceil(args.steps / k)
    history = load_history(args.weights, names) if args.weights else None
    ctl = losses = None
    if args.synthetic:
        cfg = DDKConfig(policy=args.policy, interval=k, alpha=args.alpha,
                        initial_sampling=args.initial_sampling,
                        static_weights=None if args.static_weights is None else
                        list(_floats(args.static_weights, n, "--static-weights")),
                        weight_floor=args.weight_floor, weight_cap=args.weight_cap,
                        max_epochs_per_domain=args.max_epochs_per_domain)
        ctl = DDKController(cfg, names, natural, manifest_weights=manifest_w,
                            samples_per_epoch=sizes, samples_per_interval=k * gbs)
        losses = SyntheticLosses(n, args, k * gbs)
    width = max(8, max(len(x) for x in names))
    results().info(f"{n} domains, {args.steps} steps = {num_intervals} intervals of {k} x {gbs} "
                   f"samples ({args.seq_length} tokens each); cells: weight% / cumulative epochs")
    results().info(f"{'interval':>8} {'step':>8} " + " ".join(f"{x:>{width + 6}}" for x in names))
    starts: List[List[str]] = [[] for _ in names]  # per domain: "epoch@interval"
    for t in range(num_intervals):
        steps = min(k, args.steps - t * k)
        if ctl is not None:
            seen = mix.samples_consumed
            w = ctl.next_weights(t * k, losses.student(seen), losses.teacher,
                                 samples_consumed=seen)
        else:
            w = history[min(t, len(history) - 1)]
        wraps_before = mix.num_wraps
        mix.start_interval(w, num_steps=steps)
        mix.advance(steps)
        for i in np.flatnonzero(mix.num_wraps > wraps_before):
            first = wraps_before[i] + 2
            starts[i].append(f"{first}@{t}" if mix.num_wraps[i] + 1 == first
                             else f"{first}-{mix.num_wraps[i] + 1}@{t}")
        cells = [f"{100 * wi:6.2f}%/{ep:5.2f}" for wi, ep in zip(w, mix.epochs)]
        results().info(f"{t:>8} {t * k:>8} " + " ".join(f"{c:>{width + 6}}" for c in cells))
    results().info("\nrepeats (epoch@interval: a domain starting another pass, with a new "
                   "shuffle):")
    for name, marks in zip(names, starts):
        if marks:
            first = int(marks[0].split("@")[1])
            results().info(f"  {name}: first repeat in interval {first} (step >= {first * k}); "
                           + " ".join(marks))
    if not any(starts):
        results().info("  none: every domain stays within one epoch")
    results().info("\ntotals:")
    results().info(f"  {'domain':<{width}} {'samples':>12} {'tokens':>15} {'epochs':>8} "
                   f"{'share':>7}")
    total = mix.samples_consumed.sum()
    for i, name in enumerate(names):
        c = int(mix.samples_consumed[i])
        results().info(f"  {name:<{width}} {c:>12} {c * args.seq_length:>15} {mix.epochs[i]:>8.3f} "
                       f"{100 * c / total:>6.2f}%")
    print_store_coverage(args, names, sizes, natural, np.minimum(mix.samples_consumed, sizes))


def print_store_coverage(args, names, sizes, natural, drawn) -> None:
    """What an offline teacher store must cover (`megatron-ddk cache-teacher`)."""
    from megatron_ddk.data.teacher_store import max_samples_per_domain

    policy = args.policy if args.synthetic else "ddk"
    first = natural  # interval 0 of ddk (initial_sampling natural) and the default static mix
    if policy == "static" and args.static_weights:
        first = _floats(args.static_weights, len(names), "--static-weights")
    bound = max_samples_per_domain(sizes, args.global_batch_size, args.interval, args.steps,
                                   policy, weights=first, alpha=args.alpha, seed=args.seed)
    results().info(f"\noffline teacher store (`megatron-ddk cache-teacher`): this simulation "
                   f"draws --max-samples-per-domain {int(np.max(drawn))}; any weights policy "
                   f"{policy} may choose (alpha {args.alpha}): --max-samples-per-domain "
                   f"{int(np.max(bound))} (per domain: "
                   + ", ".join(f"{n}={int(b)}" for n, b in zip(names, bound)) + ")")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    args = parse_args(argv)
    if args.weights and args.policy != "ddk":
        logging.warning("--policy is ignored with --weights (the history fixes the weights)")
    simulate(args)  # a ValueError: one `error:` line, exit 2 (cli.run_tool)
    return 0

