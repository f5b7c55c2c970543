"""Entry functions of `megatron-ddk train` and `megatron-ddk eval` (python -m megatron_ddk.train
too) and of `megatron-ddk cache-teacher`.

Each is straight-line: prepare the config (training/prepare.py: the same path check-config runs),
run the host checks, start the parallel context, run, destroy the context in a `finally`. User
errors propagate as ValueError (NonFiniteLossError for a diverged loss); the caller turns them
into one line and an exit code (console.run_command, the one mapping). Training also installs the
pre-emption handler (SIGTERM / SIGUSR1: save a checkpoint at the next step and exit 0).

This module imports torch and Megatron-Core only after the config passed prepare_run: importing
the trainer takes seconds, reporting a typo in a config a fraction of one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from typing import List, Optional

from megatron_ddk.atomic import check_writable_folder, write_atomic
from megatron_ddk.config import RunConfig
from megatron_ddk.console import results
from megatron_ddk.parallel.launcher import launcher_env
from megatron_ddk.training.prepare import PreparedRun, prepare

logger = logging.getLogger("megatron_ddk")

_STOP = {"requested": False}


def _on_signal(signum, _frame):
    _STOP["requested"] = True
    logging.getLogger(__name__).warning("received signal %d: checkpointing at the next step",
                                        signum)


def _install_stop_signals(save_on_signal: bool) -> None:
    """checkpoint.save_on_signal: SIGTERM / SIGUSR1 checkpoint at the next step and exit 0;
    when false they keep their default action (SIGTERM ends the run at once, no checkpoint)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_signal if save_on_signal else signal.SIG_DFL)
    if not save_on_signal:
        logging.getLogger(__name__).info("checkpoint.save_on_signal is false: SIGTERM / SIGUSR1 "
                                         "end the run without a checkpoint")


def _setup_logging(cfg, rank: int) -> None:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    level = getattr(logging, cfg.logging.log_level)
    root = logging.getLogger()
    root.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s [rank %(rank)s] %(message)s")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    for noisy in ("megatron.core", "megatron"):  # bucket and optimizer dumps at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if rank == 0:
        os.makedirs(cfg.logging.run_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(cfg.logging.run_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    old = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = old(*args, **kwargs)
        record.rank = rank
        return record

    logging.setLogRecordFactory(factory)


def prepare_config(config: str, overrides: List[str], load: Optional[str] = None,
                   training: bool = False) -> RunConfig:
    """The config of prepared_run."""
    return prepared_run(config, overrides, load, training).cfg


def prepared_run(config: str, overrides: List[str], load: Optional[str] = None,
                 training: bool = False) -> PreparedRun:
    """prepare (what check-config runs: the config and its checkpoints, each resolved once),
    then the host checks and this rank's logging."""
    run = prepare(config, overrides, load=load, training=training)
    from megatron_ddk.config.host import host_checks  # imports torch

    host_checks(run.cfg)
    _setup_logging(run.cfg, launcher_env()[0])
    return run


def start_parallel(cfg: RunConfig):
    """torch.distributed and Megatron-Core's groups for the config's TP x PP layout."""
    from megatron_ddk.parallel import initialize

    return initialize(cfg.parallel.tensor_model_parallel_size,
                      cfg.parallel.pipeline_model_parallel_size, seed=cfg.train.seed,
                      backend=cfg.parallel.distributed_backend,
                      timeout_minutes=cfg.parallel.distributed_timeout_minutes)


def train_main(config: str, overrides: List[str], load: Optional[str] = None) -> int:
    """Train a run (one process or one torchrun rank); returns the Trainer's exit code."""
    run = prepared_run(config, overrides, load, training=True)
    from megatron_ddk.parallel import destroy
    from megatron_ddk.training.trainer import Trainer

    ctx = start_parallel(run.cfg)
    _install_stop_signals(run.cfg.checkpoint.save_on_signal)
    try:
        return Trainer(run.cfg, ctx, stop_flag=lambda: _STOP["requested"],
                       checkpoints=run.checkpoints).run()
    finally:
        destroy()


def eval_main(config: str, overrides: List[str], load: str, output: Optional[str] = None,
              split: str = "test", samples: Optional[int] = None) -> int:
    """Per-domain CE / perplexity of a checkpoint on a held-out split (test by default; valid
    is DDK's steering set); prints a table, writes JSON (training/evaluation_command.py)."""
    cfg = prepare_config(config, list(overrides) + ["distill.teacher=null", "ddk.policy=static"])
    if output:  # before the evaluation, not after it
        check_writable_folder(os.path.dirname(os.path.abspath(output)), "--output")
    from megatron_ddk.parallel import destroy
    from megatron_ddk.training.evaluation_command import evaluate_checkpoint

    ctx = start_parallel(cfg)
    try:
        result = evaluate_checkpoint(cfg, ctx, load, split=split, num_samples=samples)
    finally:
        destroy()
    if ctx.rank == 0:
        results().info(format_table(result))
        if output:
            write_atomic(output, json.dumps(result, indent=1))
    return 0


def cache_teacher_main(config: str, overrides: List[str], out: str, **kwargs) -> int:
    """`megatron-ddk cache-teacher`: write the offline teacher store of the config's teacher
    (training/teacher_cache.py; kwargs go to cache_teacher_logits) and print its table."""
    cfg = prepare_config(config, overrides)
    from megatron_ddk.parallel import destroy
    from megatron_ddk.training.teacher_cache import cache_teacher_logits, format_summary

    ctx = start_parallel(cfg)
    try:
        summary = cache_teacher_logits(cfg, ctx, out, **kwargs)
    finally:
        destroy()
    if ctx.rank == 0:
        results().info(format_summary(summary))
    return 0


def format_table(result: dict) -> str:
    """The eval result as a fixed-width table (split and seq_length in its first line)."""
    head = f"split {result.get('split')}, seq_length {result.get('seq_length')}"
    if result.get("fingerprint"):
        head += f", samples {result['fingerprint'][:19]}"
    lines = [head, f"{'domain':<24} {'loss':>8} {'ppl':>10} {'samples':>8} {'tokens':>10}"]
    for name, r in result["domains"].items():
        lines.append(f"{name:<24} {r['loss']:>8.4f} {r['ppl']:>10.3f} "
                     f"{int(r.get('samples', 0)):>8d} {int(r['tokens']):>10d}")
    return "\n".join(lines)
