"""PNG plots of training runs and eval results (matplotlib, Agg backend: no display needed).

Each function draws one figure from data read by report.py, writes it to `path` and returns the
path, or returns None when the run did not record what the figure needs (a static-policy run has
no interval perplexities). A domain keeps the same colour in every figure.

Must not import torch or megatron_ddk.training.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_ddk.reporting.report import RunRecords  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 110


def _colour(i: int):
    return plt.get_cmap("tab10")(i % 10)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def _values(recs: Sequence[Dict[str, Any]], key: str, index: int) -> List[float]:
    """recs[*][key][index], NaN where the record has no value (matplotlib leaves a gap)."""
    out = []
    for rec in recs:
        vals = rec.get(key)
        out.append(math.nan if vals is None or vals[index] is None else float(vals[index]))
    return out


def _interval_bounds(run: RunRecords) -> List[float]:
    """Start step of every interval, then the step the last one ended at."""
    starts = [float(r["step"]) for r in run.intervals]
    end = float(run.last_step)
    if end <= starts[-1]:
        size = (run.config.get("ddk") or {}).get("interval") or 1
        end = starts[-1] + float(size)
    return starts + [end]


def plot_weights(run: RunRecords, path: str) -> Optional[str]:
    """Domain weights of every interval against step: stacked shares (left) and one line per
    domain (right, where small moves show)."""
    if not run.intervals:
        return None
    bounds = _interval_bounds(run)
    xs: List[float] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        xs += [a, b]
    names = run.domains
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cols = [_colour(i) for i in range(len(names))]
    per_domain = [_values(run.intervals, "weights", i) for i in range(len(names))]
    ax1.stackplot(xs, [[w for w in ws for _ in (0, 1)] for ws in per_domain], colors=cols,
                  alpha=0.85)
    for b in bounds[1:-1]:
        ax1.axvline(b, color="white", linewidth=0.6)
    ax1.set_xlim(xs[0], xs[-1])
    ax1.set_ylim(0, 1)
    ax1.set_title("stacked shares")
    for name, ws, c in zip(names, per_domain, cols):
        ax2.step(bounds, ws + ws[-1:], where="post", color=c, label=name)
    ax2.set_title("weight per domain")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("sampling weight")
    ax2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: domain weights per interval (policy {run.policy or '?'})")
    return _save(fig, path)


def ratio_error_bars(recs: Sequence[Dict[str, Any]], index: int
                     ) -> Tuple[List[int], List[float], List[float]]:
    """(record positions, below, above) of the 95% intervals (ratio_ci95) one domain recorded:
    the distances from its ratio down to lo and up to hi."""
    where, below, above = [], [], []
    for k, rec in enumerate(recs):
        ci, ratio = rec.get("ratio_ci95"), rec.get("ratio")
        if ci is None or ratio is None or ci[index] is None or ratio[index] is None:
            continue
        where.append(k)
        below.append(float(ratio[index]) - float(ci[index][0]))
        above.append(float(ci[index][1]) - float(ratio[index]))
    return where, below, above


def plot_interval_ppl(run: RunRecords, path: str) -> Optional[str]:
    """Student (solid) and teacher (dashed) validation perplexity per domain, and their ratio
    with its 95% interval (error bars, where the record has ratio_ci95), at the start of every
    interval; None if the run recorded none (static / equal policies)."""
    if not run.has_interval_ppl():
        return None
    steps = [float(r["step"]) for r in run.intervals]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    with_bars = False
    for i, name in enumerate(run.domains):
        c = _colour(i)
        ax1.plot(steps, _values(run.intervals, "ppl_student", i), "o-", color=c, label=name)
        ax1.plot(steps, _values(run.intervals, "ppl_teacher", i), "--", color=c, alpha=0.7)
        ratio = _values(run.intervals, "ratio", i)
        ax2.plot(steps, ratio, "o-", color=c, label=name)
        where, below, above = ratio_error_bars(run.intervals, i)
        if where:
            with_bars = True
            ax2.errorbar([steps[k] for k in where], [ratio[k] for k in where],
                         yerr=[below, above], fmt="none", ecolor=c, capsize=3, alpha=0.8)
    ax1.set_title("validation perplexity (solid: student, dashed: teacher)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("perplexity")
    ax2.set_title("student / teacher perplexity ratio" + (" (bars: 95% CI)" if with_bars else ""))
    ax2.set_xlabel("step")
    ax2.set_ylabel("ppl_S / ppl_T")
    ax2.legend(fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: per-domain evaluation at each interval")
    return _save(fig, path)


def plot_losses(run: RunRecords, path: str) -> Optional[str]:
    """loss, lm_loss (CE) and kd_loss (KL, right axis) against step."""
    if not run.steps:
        return None
    steps = [float(r["step"]) for r in run.steps]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, style in (("loss", "-"), ("lm_loss", "--")):
        ax.plot(steps, [r.get(key, math.nan) for r in run.steps], style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    kd = [r.get("kd_loss") for r in run.steps]
    if any(v for v in kd):
        ax2 = ax.twinx()
        ax2.plot(steps, [math.nan if v is None else v for v in kd], ":", color="tab:red",
                 label="kd_loss")
        ax2.set_ylabel("kd_loss (KL, nats)", color="tab:red")
        ax2.legend(loc="upper center", frameon=False)
    ax.legend(loc="upper right", frameon=False)
    ax.set_title(f"{run.name}: training loss")
    return _save(fig, path)


def plot_loss_overlay(runs: Sequence[RunRecords], path: str) -> Optional[str]:
    """lm_loss (the CE, comparable with and without a teacher) and loss of several runs."""
    runs = [r for r in runs if r.steps]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("lm_loss", "loss")):
        for i, run in enumerate(runs):
            ax.plot([r["step"] for r in run.steps], [r.get(key, math.nan) for r in run.steps],
                    color=_colour(i), label=run.name)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key} (nats)")
        ax.set_title(f"training {key}" + (" (CE)" if key == "lm_loss" else " (CE + KD term)"))
    axes[0].legend(frameon=False)
    return _save(fig, path)


def plot_ppl_bars(table: Dict[str, Any], path: str) -> Optional[str]:
    """Grouped bars: one group per domain (plus the token-weighted mean), one bar per eval."""
    cols, domains = table["columns"], table["domains"]
    if not cols:
        return None
    groups = domains + ["mean (token-weighted)"]
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(groups) * max(1, len(cols) / 3)), 4.5))
    values = []
    for j, col in enumerate(cols):
        vals = [table["ppl"][col][d] for d in domains] + [table["mean_ppl"][col]]
        values += vals
        xs = [g + (j - (len(cols) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width=width, label=col, color=_colour(j))
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title("per-domain perplexity")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_run(run: RunRecords, out_dir: str, prefix: str = "") -> List[str]:
    """Every per-run figure into out_dir; returns the files written."""
    made = [plot_weights(run, os.path.join(out_dir, f"{prefix}weights.png")),
            plot_interval_ppl(run, os.path.join(out_dir, f"{prefix}interval_ppl.png")),
            plot_losses(run, os.path.join(out_dir, f"{prefix}loss.png"))]
    return [p for p in made if p]
