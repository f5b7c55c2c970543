"""The arms x seeds part of a report: numbers (study.py), plots (study_plots.py), Markdown.

Used by `megatron-ddk report` whenever evaluation names carry a seed (ARM@SEED).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

from megatron_ddk.reporting.study import (
    costs_markdown,
    interval_weights,
    signal_costs,
    study_markdown,
    summarize,
)
from megatron_ddk.reporting.study_plots import plot_arm_intervals, plot_weight_trajectories

PAIRS: Tuple[Tuple[str, str], ...] = (("DDK", "KD"), ("DDK", "ES"), ("KD", "CPT"),
                                      ("DDK", "DDK_noFS"), ("DDK_train", "DDK"))
"""Paired differences reported when both arms are present (the paper's ablation contrasts)."""


def study_section(table: Dict[str, Any], runs: Sequence[Any], out_dir: str
                  ) -> Tuple[Dict[str, Any], List[str]]:
    """(report.json part, Markdown lines) for a table with ARM@SEED columns; ({}, []) if none."""
    study = summarize(table, pairs=PAIRS)
    if not study.get("available"):
        return {}, []
    costs = signal_costs(runs)
    ddk_arms = [r.name.rpartition("@")[0] for r in runs
                if r.policy not in (None, "static") and "@" in r.name]
    weights = interval_weights(runs, list(dict.fromkeys(ddk_arms)))
    plots = {}
    plot_dir = os.path.join(out_dir, "plots")
    for key, path in (("study_weights", plot_weight_trajectories(
            runs, os.path.join(plot_dir, "study_weights.png"))),
                      ("study_arms", plot_arm_intervals(
                          study, os.path.join(plot_dir, "study_arms.png")))):
        if path:
            plots[key] = os.path.relpath(path, out_dir)
    lines = study_markdown(study) + costs_markdown(costs, weights)
    for key, title in (("study_arms", "pooled test perplexity per arm and seed"),
                       ("study_weights", "domain weights of every seed")):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    return {"study": study, "costs": costs, "interval_weights": weights, "plots": plots}, lines
