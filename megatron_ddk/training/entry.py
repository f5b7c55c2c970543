"""Entry points of `megatron-ddk train` and `megatron-ddk eval` (also python -m megatron_ddk.train).

Parse and check the config (static, then host), start the parallel context, install the
pre-emption handler (SIGTERM / SIGUSR1: save a checkpoint at the next step and exit 0), run, and
turn user errors into a clear message and a non-zero exit.
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

logger = logging.getLogger("megatron_ddk")

_STOP = {"requested": False}


def _on_signal(signum, _frame):
    _STOP["requested"] = True
    logging.getLogger(__name__).warning("received signal %d: checkpointing at the next step", signum)


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


def _prepare(config: str, overrides: List[str], load: Optional[str], training: bool = False):
    """Load the config, resolve the teacher (from its checkpoint) and checkpoint.load: auto, run
    the static checks, then (training) the save-folder guard, then the host checks."""
    from megatron_ddk.config import load_config, static_checks
    from megatron_ddk.config.host import host_checks
    from megatron_ddk.models.teacher_config import resolve_teacher
    from megatron_ddk.parallel.state import _launcher_env
    from megatron_ddk.training.run_folder import check_save_folder, resolve_load

    if load:
        overrides = list(overrides) + [f"checkpoint.load={load}"]
    cfg = resolve_load(resolve_teacher(load_config(config, overrides)))
    rank, world, _ = _launcher_env()
    static_checks(cfg, world)
    _check_output_folders(cfg, training)
    if training:
        check_save_folder(cfg)
    host_checks(cfg)
    _setup_logging(cfg, rank)
    return cfg


def _check_output_folders(cfg, training: bool) -> None:
    """Before anything is built: the run folder (and, to train, checkpoint.save) can be written."""
    check_writable_folder(cfg.logging.run_dir, "logging.run_dir")
    if training and cfg.checkpoint.save:
        check_writable_folder(cfg.checkpoint.save, "checkpoint.save")


def _start(cfg):
    from megatron_ddk.parallel import initialize

    return initialize(cfg.parallel.tensor_model_parallel_size,
                      cfg.parallel.pipeline_model_parallel_size, seed=cfg.train.seed,
                      backend=cfg.parallel.distributed_backend,
                      timeout_minutes=cfg.parallel.distributed_timeout_minutes)


def _guard(fn) -> int:
    """Run fn; user errors (ValueError) become one clear line and exit code 2."""
    from megatron_ddk.console import messages
    from megatron_ddk.training.trainer import NonFiniteLossError

    try:
        return fn()
    except NonFiniteLossError as exc:
        messages().error(f"error: {exc}")
        return 3
    except ValueError as exc:
        messages().error(f"error: {exc}")
        return 2


def train_main(config: str, overrides: List[str], load: Optional[str] = None) -> int:
    """Train a run (one process or one torchrun rank); returns the exit code."""
    def run():
        cfg = _prepare(config, overrides, load, training=True)
        ctx = _start(cfg)
        _install_stop_signals(cfg.checkpoint.save_on_signal)
        from megatron_ddk.training.trainer import Trainer

        try:
            return Trainer(cfg, ctx, stop_flag=lambda: _STOP["requested"]).run()
        finally:
            from megatron_ddk.parallel import destroy

            destroy()

    return _guard(run)


def eval_main(config: str, overrides: List[str], load: str, output: Optional[str] = None,
              split: str = "test", samples: Optional[int] = None) -> int:
    """Per-domain CE / perplexity of a checkpoint on a held-out split (test by default; valid
    is DDK's steering set); prints a table, writes JSON (training/evaluation_command.py)."""
    def run():
        cfg = _prepare(config, list(overrides) + ["distill.teacher=null", "ddk.policy=static"], None)
        ctx = _start(cfg)
        try:
            from megatron_ddk.training.evaluation_command import evaluate_checkpoint

            result = evaluate_checkpoint(cfg, ctx, load, split=split, num_samples=samples)
        finally:
            from megatron_ddk.parallel import destroy

            destroy()
        if ctx.rank == 0:
            from megatron_ddk.console import results

            results().info(format_table(result))
            if output:
                os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
                write_atomic(output, json.dumps(result, indent=1))
        return 0

    return _guard(run)


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
