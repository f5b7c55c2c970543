"""Reports of distillation runs: read run folders and eval results (report.py), draw PNG plots
(plots.py, matplotlib Agg). Used by `megatron-ddk plot` and `megatron-ddk report`; docs/report.md
explains the output.

Importing this package does not import matplotlib; import megatron_ddk.reporting.plots for that.
Must not import torch or megatron_ddk.training.
"""

from megatron_ddk.reporting.report import (
    EvalResult,
    RunRecords,
    assemble,
    compare,
    improvements,
    load_eval,
    load_run,
    load_timing,
    ppl_table,
    read_jsonl,
    render_markdown,
    weight_direction,
)

__all__ = ["EvalResult", "RunRecords", "assemble", "compare", "improvements", "load_eval",
           "load_run", "load_timing", "ppl_table", "read_jsonl", "render_markdown",
           "weight_direction"]
