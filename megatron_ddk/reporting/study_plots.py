"""Plots of an arms x seeds study: every seed's weight trajectory in one figure per arm, and the
per-arm pooled perplexity with its 95% interval. Matplotlib (Agg); no torch.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from megatron_ddk.reporting.plots import _colour, _interval_bounds, _save, _values, plt
from megatron_ddk.reporting.report import RunRecords
from megatron_ddk.reporting.study import split_column

_STYLES = ["-", "--", ":", "-."]


def plot_weight_trajectories(runs: Sequence[RunRecords], path: str) -> Optional[str]:
    """One panel per arm whose weights move (not static); a colour per domain, a line style per
    seed: every seed's trajectory is visible at once."""
    by_arm: Dict[str, List[RunRecords]] = {}
    for run in runs:
        arm, _ = split_column(run.name)
        if run.intervals and run.policy not in ("static", None) and len(run.intervals) > 1:
            by_arm.setdefault(arm, []).append(run)
    if not by_arm:
        return None
    fig, axes = plt.subplots(1, len(by_arm), figsize=(5.2 * len(by_arm), 4.0), squeeze=False)
    for ax, (arm, arm_runs) in zip(axes[0], by_arm.items()):
        names = arm_runs[0].domains
        for j, run in enumerate(arm_runs):
            bounds = _interval_bounds(run)
            for i, name in enumerate(names):
                ws = _values(run.intervals, "weights", i)
                ax.step(bounds, ws + ws[-1:], where="post", color=_colour(i),
                        linestyle=_STYLES[j % len(_STYLES)], alpha=0.85,
                        label=name if j == 0 else None)
        seeds = ", ".join(str(split_column(r.name)[1]) for r in arm_runs)
        ax.set_title(f"{arm} (seeds {seeds}; line style = seed)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("sampling weight")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle("domain weights per interval, every seed")
    return _save(fig, path)


def plot_arm_intervals(study: Dict[str, Any], path: str) -> Optional[str]:
    """Pooled test perplexity per arm: each seed as a dot, the mean with its 95% interval."""
    if not study.get("available"):
        return None
    arms = list(study["arms"])
    fig, ax = plt.subplots(figsize=(1.4 * len(arms) + 2.5, 3.6))
    for i, arm in enumerate(arms):
        stat = study["arms"][arm]["metrics"]["pooled_ppl"]
        ax.scatter([i] * stat["n"], stat["values"], color=_colour(i), alpha=0.6, s=18)
        err = stat["half_width"] or 0.0
        ax.errorbar([i + 0.15], [stat["mean"]], yerr=[[err], [err]], fmt="o", color="black",
                    capsize=4)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms)
    ax.set_ylabel("pooled test perplexity")
    ax.set_title("per arm: seeds (dots), mean and 95% interval (black)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save(fig, path)
