"""What a run reports: a readable log line, TensorBoard scalars, metrics.jsonl, run metadata.

Only the logging rank (last pipeline stage, TP rank 0, DP rank 0) writes; other ranks get a
RunLogger whose methods do nothing, so call sites stay unconditional. metrics.jsonl holds one
JSON object per logged step ({"kind": "step", ...}) and one per DDK interval
({"kind": "interval", ...}). The file always reads as one run:
- a fresh run (resume_step 0) finding an earlier run's metrics.jsonl moves it aside to
  metrics.<time of its last write>.jsonl (and tensorboard/ to tensorboard.<same time>/) and
  starts a new file;
- a resumed run (resume_step S > 0) keeps the step records up to S and the interval records
  before S, and drops the rest (written by a run that died after its last checkpoint; the
  interval starting at S is decided again after the resume), then appends.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional

from megatron_ddk.atomic import remove_stale_tmp, write_atomic

logger = logging.getLogger(__name__)

STEP_FIELDS = ("step", "loss", "lm_loss", "kd_loss", "lr", "grad_norm", "consumed_samples")


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> Dict[str, str]:
    """Versions of the packages a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "numpy", "sentencepiece", "transformer-engine"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def format_duration(seconds: float) -> str:
    """1h02m03s style."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def kept_after_resume(rec: Dict[str, Any], step: int) -> bool:
    """Whether a metrics record survives a resume from the checkpoint of `step`.

    Step records up to `step` were written before that checkpoint. The interval record
    of `step` itself is written after it (the next interval starts in the next loop turn) and is
    written again by the resumed run, so interval records are kept only before `step`. An "end"
    record is kept only before `step` too: the resumed run continues, so it did not end there.
    """
    s = rec.get("step", 0)
    if rec.get("kind") in ("interval", "end"):
        return s < step
    return s <= step


def truncate_records(path: str, step: int) -> None:
    """Rewrite metrics.jsonl keeping only what a resume from `step` keeps (atomically)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if kept_after_resume(rec, step):
                keep.append(json.dumps(rec) + "\n")
    write_atomic(path, "".join(keep))


def keep_previous_run(run_dir: str) -> Optional[str]:
    """Move an earlier run's metrics.jsonl (and tensorboard/) aside before a fresh run.

    They become metrics.<YYYYmmdd-HHMMSS>.jsonl and tensorboard.<same>/, stamped with the time
    metrics.jsonl was last written. Returns the new metrics path, or None when there was none.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    tag, n = stamp, 1
    while (os.path.exists(os.path.join(run_dir, f"metrics.{tag}.jsonl"))
           or os.path.exists(os.path.join(run_dir, f"tensorboard.{tag}"))):
        n += 1
        tag = f"{stamp}-{n}"
    old = os.path.join(run_dir, f"metrics.{tag}.jsonl")
    os.replace(path, old)
    tb = os.path.join(run_dir, "tensorboard")
    if os.path.isdir(tb):
        os.replace(tb, os.path.join(run_dir, f"tensorboard.{tag}"))
    logger.warning("%s held an earlier run's metrics: kept as %s; this run starts a new "
                   "metrics.jsonl", run_dir, os.path.basename(old))
    return old


class RunLogger:
    """Writes the run folder's log artefacts (a no-op on non-logging ranks).

    Args:
        run_dir: the run folder.
        enabled: False on every rank but the logging rank.
        tensorboard: also write TensorBoard scalars under run_dir/tensorboard.
        resume_step: the step a resumed run continues from; 0 means a fresh run.
        wandb: a factory of the Weights & Biases writer (training/wandb_log.py), called on the
            logging rank only; None: no wandb.
    """

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int = 0,
                 wandb: Optional[Callable[[], Any]] = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        remove_stale_tmp(path)
        if resume_step > 0:
            truncate_records(path, resume_step)
        else:
            keep_previous_run(run_dir)
        self._jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                     purge_step=resume_step or None)
        if wandb is not None:
            self._wandb = wandb()

    def write_metadata(self, config_yaml: str, extra: Dict[str, Any]) -> None:
        """run_config.yaml and metadata.json (git commit, versions, tokenizer hash, ...)."""
        if not self.enabled:
            return
        write_atomic(os.path.join(self.run_dir, "run_config.yaml"), config_yaml)
        meta = dict(extra, git_commit=_git_commit(), versions=package_versions(),
                    command=" ".join(sys.argv))
        write_atomic(os.path.join(self.run_dir, "metadata.json"),
                     json.dumps(meta, indent=1, sort_keys=True))

    def record(self, kind: str, values: Dict[str, Any]) -> None:
        """Append one JSON record to metrics.jsonl."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(dict(kind=kind, **values)) + "\n")
        self._jsonl.flush()

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "") -> None:
        """TensorBoard (and wandb) scalars (skips None)."""
        if self._wandb is not None:
            self._wandb.log(step, {prefix + key: value for key, value in values.items()})
        if self._tb is None:
            return
        for key, value in values.items():
            if value is not None:
                self._tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def step_line(rec: Dict[str, Any], train_iters: int, elapsed: float, remaining: float) -> str:
    """The readable per-interval log line."""
    parts = [f"step {rec['step']:>6d}/{train_iters}",
             f"loss {rec['loss']:.4f}", f"ce {rec['lm_loss']:.4f}", f"kl {rec['kd_loss']:.4f}",
             f"lr {rec['lr']:.3e}",
             f"grad {rec['grad_norm']:.3f}" if rec.get('grad_norm') is not None else "grad n/a",
             f"tok/s {rec['tokens_per_sec']:.0f}"]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    parts += [f"elapsed {format_duration(elapsed)}", f"eta {format_duration(remaining)}"]
    return " | ".join(parts)
