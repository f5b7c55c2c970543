"""What a run reports: a readable log line, TensorBoard scalars, metrics.jsonl, run metadata.

Only the logging rank (last pipeline stage, TP rank 0, DP rank 0) writes; other ranks get a
RunLogger whose methods do nothing, so call sites stay unconditional. metrics.jsonl holds one
JSON object per logged step ({"kind": "step", ...}) and one per DDK interval
({"kind": "interval", ...}); a resumed run appends after dropping records past its start step,
so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from typing import Any, Dict, Optional

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


class RunLogger:
    """Writes the run folder's log artefacts (a no-op on non-logging ranks)."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate_after(path, resume_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step or None)

    @staticmethod
    def _truncate_after(path: str, step: int) -> None:
        """Drop records past `step` (left by a run that died after its last checkpoint)."""
        if not os.path.isfile(path):
            return
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= step:
                    keep.append(json.dumps(rec))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(k + "\n" for k in keep))
        os.replace(tmp, path)

    def write_metadata(self, config_yaml: str, extra: Dict[str, Any]) -> None:
        """run_config.yaml and metadata.json (git commit, versions, tokenizer hash, ...)."""
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, "run_config.yaml"), "w") as f:
            f.write(config_yaml)
        meta = dict(extra, git_commit=_git_commit(), versions=package_versions(),
                    command=" ".join(sys.argv))
        with open(os.path.join(self.run_dir, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)

    def record(self, kind: str, values: Dict[str, Any]) -> None:
        """Append one JSON record to metrics.jsonl."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(dict(kind=kind, **values)) + "\n")
        self._jsonl.flush()

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "") -> None:
        """TensorBoard scalars (skips None)."""
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


def step_line(rec: Dict[str, Any], train_iters: int, elapsed: float, remaining: float) -> str:
    """The readable per-interval log line."""
    parts = [f"step {rec['step']:>6d}/{train_iters}",
             f"loss {rec['loss']:.4f}", f"ce {rec['lm_loss']:.4f}", f"kl {rec['kd_loss']:.4f}",
             f"lr {rec['lr']:.3e}", f"grad {rec['grad_norm']:.3f}" if rec.get('grad_norm') is not None else "grad n/a",
             f"tok/s {rec['tokens_per_sec']:.0f}"]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    parts += [f"elapsed {format_duration(elapsed)}", f"eta {format_duration(remaining)}"]
    return " | ".join(parts)
