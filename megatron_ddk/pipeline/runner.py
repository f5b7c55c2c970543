"""`megatron-ddk pipeline`: check the whole config, then run every stage in order.

A rerun skips what is done and unchanged, resumes a training stage that was killed part-way from
its last checkpoint, and reruns a changed stage and everything after it (stamps.py). Stage
times go to <out>/timing.json and into the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import List, Optional

from megatron_ddk.atomic import write_atomic
from megatron_ddk.pipeline.config import PipelineConfig, load_pipeline_config
from megatron_ddk.pipeline.plan import PipelinePlan
from megatron_ddk.pipeline.stage import Stage, StageRunner
from megatron_ddk.pipeline.stages import (
    arm_stages,
    data_stages,
    eval_stages,
    export_stages,
    lm_eval_stages,
    model_stage,
    report_stage,
)

logger = logging.getLogger("megatron_ddk.pipeline")


def _with_existing_deps(stages: List[Stage]) -> List[Stage]:
    """Drop dependencies on stages this config does not have (e.g. datasets with a manifest);
    every training stage also depends on the datasets."""
    names = {s.name for s in stages}
    for s in stages:
        if s.name not in ("corpus", "datasets") and "datasets" in names:
            s.deps = ["datasets"] + [d for d in s.deps if d != "datasets"]
        s.deps = [d for d in s.deps if d in names]
    return stages


def _write_timing(path: str, runner: StageRunner) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps({k: round(v, 1) for k, v in runner.timing.items()}, indent=1))


def run_pipeline(cfg: PipelineConfig) -> str:
    """Run (or resume) the pipeline; returns the report path."""
    t0 = time.time()
    plan = PipelinePlan(cfg)
    plan.check()
    runner = StageRunner(plan.out)
    timing_path = os.path.join(plan.out, "timing.json")
    stages = data_stages(plan)
    stages += [model_stage(plan, "teacher", ["datasets"]),
               model_stage(plan, "student", ["datasets"])]
    stages += arm_stages(plan)
    stages += eval_stages(plan)
    stages += export_stages(plan) + lm_eval_stages(plan)
    stages.append(report_stage(plan, timing_path))
    for stage in _with_existing_deps(stages):
        if stage.name == "report":
            _write_timing(timing_path, runner)
        runner.run(stage)
    skipped = len(stages) - len(runner.ran)
    report = os.path.join(plan.out, "report.md")
    logger.info("[pipeline] %d stage(s) ran, %d skipped; total %.1f s; report %s",
                len(runner.ran), skipped, time.time() - t0, report)
    return report


def pipeline_main(config: str, overrides: List[str], corpus: Optional[str] = None,
                  out: Optional[str] = None, smoke: bool = False) -> int:
    """Entry of `megatron-ddk pipeline`: load the pipeline config and run it. A user error
    propagates as ValueError (exit 2), a failed stage as StageFailed (exit 1): console.run_command
    maps them."""
    logging.getLogger("megatron_ddk.pipeline").setLevel(logging.INFO)
    run_pipeline(load_pipeline_config(config, overrides, smoke=smoke, corpus=corpus, out=out))
    return 0
