"""The downstream table of a report: lm-eval metrics per arm x seed, mean and 95% interval.

Input: {column: lm-eval result} with columns named `ARM@SEED` (reporting/study.py's
convention) or plain names (teacher, student_before: one value, no interval); each result is
run_lm_eval()'s dict (or its JSON file). Output: rows per (task, metric) with, per arm, the
values of its seeds and their mean +- the two-sided 95% Student-t half width
(reporting.study.mean_interval; None with one seed), and a Markdown rendering. Pure (the
optional JSON reading aside); imports only reporting.study.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from megatron_ddk.reporting.study import mean_interval, split_column

DEFAULT_METRICS = ("token_perplexity", "acc", "acc_norm", "exact_match", "pass@1",
                   "word_perplexity")
"""Metrics shown when present (lm-eval task metrics; others are kept in the data only)."""


def load_results(paths: Mapping[str, str]) -> Dict[str, Dict[str, Any]]:
    """{column: result dict} from {column: lm-eval JSON path}."""
    out = {}
    for column, path in paths.items():
        with open(path, encoding="utf-8") as f:
            out[column] = json.load(f)
        if "metrics" not in out[column]:
            raise ValueError(f"{path}: not a megatron-ddk lm-eval result (no 'metrics'); write "
                             f"it with `megatron-ddk lm-eval --output`")
    return out


def downstream_table(results: Mapping[str, Mapping[str, Any]],
                     metrics: Sequence[str] = DEFAULT_METRICS) -> Dict[str, Any]:
    """{"arms": [...], "rows": [{"task", "metric", "cells": {arm: interval}}]}."""
    groups: Dict[str, Dict[Optional[int], Mapping[str, Any]]] = {}
    for column, res in results.items():
        arm, seed = split_column(column)
        groups.setdefault(arm, {})[seed] = res
    keys = []
    for res in results.values():
        for task, values in res["metrics"].items():
            keys += [(task, m) for m in values if m in metrics and (task, m) not in keys]
    rows = []
    for task, metric in sorted(keys):
        cells = {}
        for arm, seeds in groups.items():
            vals = [r["metrics"].get(task, {}).get(metric) for _, r in sorted(
                seeds.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
            vals = [v for v in vals if v is not None]
            if vals:
                cells[arm] = mean_interval(vals)
        rows.append({"task": task, "metric": metric, "cells": cells})
    return {"arms": list(groups), "rows": rows}


def _cell(c: Optional[Mapping[str, Any]]) -> str:
    if c is None:
        return "-"
    text = f"{c['mean']:.4g}"
    if c["half_width"] is not None:
        text += f" ± {c['half_width']:.3g} (n={c['n']})"
    return text


def render_markdown(table: Mapping[str, Any]) -> str:
    """The table as Markdown: one row per task and metric, one column per arm."""
    arms: List[str] = list(table["arms"])
    lines = ["| task | metric | " + " | ".join(arms) + " |",
             "| --- | --- | " + " | ".join("---" for _ in arms) + " |"]
    for row in table["rows"]:
        lines.append(f"| {row['task']} | {row['metric']} | "
                     + " | ".join(_cell(row["cells"].get(a)) for a in arms) + " |")
    return "\n".join(lines) + "\n\nmean ± half width of the 95% Student-t interval over seeds.\n"
