"""Progress of a preprocessing run: a tqdm bar on a terminal (documents, MB, tokens/s), or
Megatron-LM's plain line every `log_interval` documents:

    Processed 1000 documents (812.3 docs/s, 4.1 MB/s).

(on stderr, through megatron_ddk.console's message logger). Called once per batch by the engine
with (documents, bytes, tokens); a line is written for each multiple of log_interval the batch
crosses. The bar is created at the first update, after a worker pool has forked (tqdm's monitor
thread must not exist when the process forks). Imports tqdm lazily; from megatron_ddk only
console.
"""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """progress(num_docs, num_bytes, num_tokens) per batch; close() at the end."""

    def __init__(self, bar: bool, log_interval: Optional[int] = None, desc: str = "") -> None:
        self.use_bar, self.log_interval, self.desc = bar, log_interval, desc
        self.docs = self.bytes = self.tokens = 0
        self.start, self.last, self._bar = time.perf_counter(), 0.0, None

    @classmethod
    def auto(cls, log_interval: Optional[int], desc: str = "", interactive: Optional[bool] = None,
             force_lines: bool = False) -> "Progress":
        """A bar on a terminal, Megatron-LM's lines otherwise (or when force_lines)."""
        tty = sys.stderr.isatty() if interactive is None else interactive
        bar = tty and not force_lines
        return cls(bar=bar, log_interval=None if bar else (log_interval or 1000), desc=desc)

    def __call__(self, num_docs: int, num_bytes: int, num_tokens: int) -> None:
        before = self.docs
        self.docs += num_docs
        self.bytes += num_bytes
        self.tokens += num_tokens
        now = time.perf_counter()
        if self.use_bar:
            self._update_bar(num_docs, num_bytes, now)
        if self.log_interval:
            elapsed = max(now - self.start, 1e-9)
            for count in range((before // self.log_interval + 1) * self.log_interval,
                               self.docs + 1, self.log_interval):
                self._line(count, elapsed)

    def _line(self, count: int, elapsed: float) -> None:
        from megatron_ddk.console import messages

        mbs = self.bytes / elapsed / 1024 / 1024
        messages().info(f"Processed {count} documents ({count / elapsed} docs/s, {mbs} MB/s).")

    def _update_bar(self, num_docs: int, num_bytes: int, now: float) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(desc=self.desc, unit="doc", dynamic_ncols=True, file=sys.stderr)
            # rates over the whole run, as the postfix (tqdm has its own clock)
            self._bar.start_t = self._bar._time() - (now - self.start)
        self._bar.update(num_docs)
        if now - self.last > 0.5:
            self.last = now
            self._bar.set_postfix_str(self._rates(now))

    def _rates(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        return (f"{self.bytes / 2**20:,.1f} MB, {self.bytes / 2**20 / elapsed:,.1f} MB/s, "
                f"{self.tokens / elapsed:,.0f} tok/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._rates(time.perf_counter()))
            self._bar.close()
            self._bar = None
