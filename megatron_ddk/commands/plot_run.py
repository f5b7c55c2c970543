"""Plot one or more training runs: domain weights, per-domain perplexity / ratio, loss curves.

    megatron-ddk plot runs/quickstart/ddk
    megatron-ddk plot KD=runs/quickstart/kd DDK=runs/quickstart/ddk --out /tmp/plots

For every run folder (logging.run_dir, holding metrics.jsonl) it writes
  weights.png       domain sampling weights of every interval (stacked, x = step)
  interval_ppl.png  student/teacher validation perplexity and their ratio per domain at each
                    interval (only for runs that evaluate: ddk policies; skipped for static)
  loss.png          loss, lm_loss (CE) and kd_loss (KL) against step
and, for several runs, loss_overlay.png with their CE curves on one axis. Files go to
RUN_DIR/plots/ (the overlay to the first run's), or all to --out DIR as NAME_weights.png etc.
A run argument is a folder, or NAME=FOLDER to label it. Prints each file written; exits 2 with
a message naming the file (and line) on bad input. Headless (matplotlib Agg).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence, Tuple

from megatron_ddk.console import results
from megatron_ddk.reporting import load_run
from megatron_ddk.reporting.plots import plot_loss_overlay, plot_run


def split_named(arg: str) -> Tuple[Optional[str], str]:
    """'NAME=PATH' -> (NAME, PATH); a path that exists as given, or has no '=', has no name."""
    if os.path.exists(arg) or "=" not in arg:
        return None, arg
    name, path = arg.split("=", 1)
    return name, path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder, or NAME=RUN_DIR")
    p.add_argument("--out", help="write every plot here (default RUN_DIR/plots/)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    runs = [load_run(path, name) for name, path in map(split_named, args.runs)]  # exit 2
    names = [r.name for r in runs]
    written: List[str] = []
    for i, run in enumerate(runs):
        if args.out:
            label = run.name if names.count(run.name) == 1 else f"{run.name}{i}"
            written += plot_run(run, args.out, prefix=f"{label}_")
        else:
            written += plot_run(run, os.path.join(run.run_dir, "plots"))
        if not run.has_interval_ppl():
            results().info(f"{run.name}: no per-domain perplexity recorded (policy "
                           f"{run.policy or 'unknown'}); interval_ppl.png skipped")
    if len(runs) > 1:
        out = args.out or os.path.join(runs[0].run_dir, "plots")
        path = plot_loss_overlay(runs, os.path.join(out, "loss_overlay.png"))
        written += [path] if path else []
    for path in written:
        results().info(path)
    return 0

