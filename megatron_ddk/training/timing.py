"""Wall-clock split of a run: teacher forward, student forward/backward, optimizer, DDK eval.

The teacher's forward runs inside the pair's forward, so it is timed by forward hooks on the
teacher module; student forward+backward is the schedule's time minus the teacher's. An offline
teacher's store reads (trainer._read_store) are a stage of their own, teacher_cache_read, also
inside the schedule's time and also taken out of student_forward_backward. On a GPU
each boundary synchronises so the numbers are real (timing costs a little throughput).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Dict, Optional

import torch

from megatron_ddk.config.optional import have_cuda


def _sync():
    if have_cuda():
        torch.cuda.synchronize()


class StageTimer:
    """Cumulative seconds per stage; `summary()` gives the split."""

    def __init__(self, teacher: Optional[torch.nn.Module] = None):
        self.total: Dict[str, float] = defaultdict(float)
        self._open: Dict[str, float] = {}
        if teacher is not None:
            teacher.register_forward_pre_hook(lambda *_: self._teacher(True))
            teacher.register_forward_hook(lambda *_: self._teacher(False))

    def _teacher(self, begin: bool) -> None:
        """Teacher forwards count only inside a training step (evaluation has its own stage)."""
        if "forward_backward" not in self._open:
            return
        if begin:
            self.start("teacher_forward")
        elif "teacher_forward" in self._open:
            self.stop("teacher_forward")

    def start(self, name: str) -> None:
        _sync()
        self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        _sync()
        self.total[name] += time.perf_counter() - self._open.pop(name)

    def summary(self) -> Dict[str, float]:
        """Seconds per stage so far (student_forward_backward excludes the teacher's forward and
        the store reads)."""
        out = dict(self.total)
        fb = out.pop("forward_backward", 0.0)
        out["student_forward_backward"] = (fb - out.get("teacher_forward", 0.0)
                                           - out.get("teacher_cache_read", 0.0) + 0.0)
        return {k: round(v, 4) for k, v in sorted(out.items())}
