"""The interval mixture: which (domain, sample) every step of interval t trains on.

Megatron-Core's BlendedDataset fixes its weights when it is built; DDK changes them every K steps.
IntervalMixture therefore keeps, per domain, a cursor (epoch, position) into a permutation of that
domain's sample ids, seeded by (seed, domain, epoch), and at each interval builds only that
interval's index (design.md, "The interval mixture"):

1. counts = largest_remainder_counts(weights, K x global_batch_size): they sum exactly and each is
   within one sample of weight x total;
2. each domain's ids are taken from its cursor; a domain that runs out starts its next epoch with
   a new permutation (the wrap is counted and logged);
3. the interval's entries are shuffled by one permutation seeded by (seed, t).

The sample stream is a pure function of (seed, domain sizes, global batch size, the weight
history and interval lengths). state_dict() stores the cursors at the interval's start, its
weights and the position inside it, so a resumed run rebuilds the same interval and continues at
the same batch: nothing is repeated or skipped.

Also here: the data-parallel slice of a global batch (Megatron's convention) and the collation of
samples from the per-domain datasets into tensors. Imports megatron_ddk.ddk.math (pure numpy)
for the rounding; must not import torch.distributed.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ddk.ddk.math import largest_remainder_counts, normalize_weights

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_DOMAIN_STREAM, _INTERVAL_STREAM = 0, 1  # keep the two seed families apart

Entry = Tuple[int, int]
"""(domain_id, sample_id) of one training sample."""


def domain_sample_order(seed: int, domain: int, num_samples: int, epoch: int) -> np.ndarray:
    """The order in which a run of `seed` draws the sample ids of `domain` in `epoch` (a
    permutation of range(num_samples)); whatever the weights, a run's first n samples of a
    domain are the first n of its epoch-0 order (the offline teacher store covers that prefix)."""
    rng = np.random.default_rng([seed, _DOMAIN_STREAM, domain, epoch])
    return rng.permutation(int(num_samples))


class IntervalMixture:
    """Per-domain cursors plus the current interval's shuffled index.

    Args:
        num_samples_per_domain: samples in one epoch of each domain's training dataset.
        global_batch_size: samples per optimizer step over all data-parallel ranks.
        interval: K, optimizer steps per interval.
        seed: run seed (>= 0).
        domain_names: for log messages only.
    """

    def __init__(self, num_samples_per_domain: Sequence[int], global_batch_size: int,
                 interval: int, seed: int, domain_names: Optional[Sequence[str]] = None) -> None:
        sizes = np.asarray(num_samples_per_domain, dtype=np.int64)
        if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes <= 0):
            raise ValueError(f"num_samples_per_domain={sizes.tolist()}: every domain needs at "
                             f"least one training sample")
        if global_batch_size < 1 or interval < 1 or seed < 0:
            raise ValueError(f"global_batch_size={global_batch_size}, interval={interval}, "
                             f"seed={seed}: need global_batch_size >= 1, interval >= 1, seed >= 0")
        self.sizes = sizes
        self.num_domains = int(sizes.size)
        self.global_batch_size = int(global_batch_size)
        self.interval = int(interval)
        self.seed = int(seed)
        self.domain_names = (list(domain_names) if domain_names is not None
                             else [f"domain{i}" for i in range(self.num_domains)])
        self._epoch = np.zeros(self.num_domains, dtype=np.int64)
        self._pos = np.zeros(self.num_domains, dtype=np.int64)
        self._perm_cache: Dict[int, Tuple[int, np.ndarray]] = {}
        self._t = -1
        self._weights: Optional[np.ndarray] = None
        self._num_steps: Optional[int] = None
        self._start_epoch = self._epoch.copy()
        self._start_pos = self._pos.copy()
        self._consumed_before = np.zeros(self.num_domains, dtype=np.int64)
        self._domains = np.zeros(0, dtype=np.int64)
        self._samples = np.zeros(0, dtype=np.int64)
        self._position = 0

    # ----------------------------------------------------------------------------- queries
    @property
    def current_interval(self) -> int:
        """Index t of the interval being served (-1 before the first start_interval)."""
        return self._t

    @property
    def steps_left(self) -> int:
        """Global batches left in the current interval."""
        return (len(self._domains) - self._position) // self.global_batch_size

    @property
    def samples_consumed(self) -> np.ndarray:
        """Per-domain samples handed out by next_global_batch so far (cumulative)."""
        served = np.bincount(self._domains[:self._position], minlength=self.num_domains)
        return self._consumed_before + served

    @property
    def epochs(self) -> np.ndarray:
        """Per-domain passes over the data handed out so far (fractional)."""
        return self.samples_consumed / self.sizes

    @property
    def num_wraps(self) -> np.ndarray:
        """Per-domain count of exhaustions: epochs started after the first (each a new shuffle)."""
        return self._epoch.copy()

    # ----------------------------------------------------------------------------- building
    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(domain)
        if cached is None or cached[0] != epoch:
            cached = (epoch, domain_sample_order(self.seed, domain, int(self.sizes[domain]), epoch))
            self._perm_cache[domain] = cached
        return cached[1]

    def _take(self, domain: int, count: int) -> np.ndarray:
        """The next `count` sample ids of `domain`, wrapping into new epochs as needed."""
        parts, n = [], int(self.sizes[domain])
        while count > 0:
            if self._pos[domain] == n:
                self._epoch[domain] += 1
                self._pos[domain] = 0
                logger.info("domain %s exhausted: epoch %d starts with a new shuffle "
                            "(interval %d)", self.domain_names[domain],
                            self._epoch[domain] + 1, self._t)
            perm = self._permutation(domain, int(self._epoch[domain]))
            start = int(self._pos[domain])
            k = min(count, n - start)
            parts.append(perm[start:start + k])
            self._pos[domain] += k
            count -= k
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _build(self, weights: np.ndarray, num_steps: int) -> None:
        """Interval self._t's index from the cursors at its start (they advance past it)."""
        counts = largest_remainder_counts(weights, num_steps * self.global_batch_size)
        ids = [self._take(d, int(c)) for d, c in enumerate(counts)]
        domains = np.repeat(np.arange(self.num_domains, dtype=np.int64), counts)
        samples = np.concatenate(ids).astype(np.int64, copy=False)
        order = np.random.default_rng([self.seed, _INTERVAL_STREAM, self._t]).permutation(
            domains.size)
        self._domains, self._samples = domains[order], samples[order]
        self._position = 0

    def start_interval(self, weights, num_steps: Optional[int] = None) -> np.ndarray:
        """Build the next interval's index from `weights`; returns the per-domain counts.

        num_steps defaults to K; pass fewer for a last, partial interval. Entries of the previous
        interval that were never handed out are dropped (logged): call this every K steps.
        """
        w = normalize_weights(weights, "interval weights")
        if w.size != self.num_domains:
            raise ValueError(f"interval weights have {w.size} entries for {self.num_domains} "
                             f"domains")
        steps = self.interval if num_steps is None else int(num_steps)
        if steps < 1:
            raise ValueError(f"num_steps={num_steps}: must be >= 1")
        if self._position < len(self._domains):
            logger.warning("interval %d ends with %d samples unserved; they are skipped",
                           self._t, len(self._domains) - self._position)
        self._consumed_before = self.samples_consumed
        self._t += 1
        self._weights, self._num_steps = w, steps
        self._start_epoch, self._start_pos = self._epoch.copy(), self._pos.copy()
        self._build(w, steps)
        return np.bincount(self._domains, minlength=self.num_domains)

    def next_global_batch(self) -> List[Entry]:
        """The next global batch: global_batch_size (domain_id, sample_id) entries, in order."""
        end = self._position + self.global_batch_size
        if end > len(self._domains):
            raise RuntimeError(f"interval {self._t} is used up; call start_interval() with the "
                               f"next weights (every {self.interval} steps)")
        batch = list(zip(self._domains[self._position:end].tolist(),
                         self._samples[self._position:end].tolist()))
        self._position = end
        return batch

    def advance(self, num_steps: int) -> None:
        """Mark the next num_steps global batches as served without reading them (simulators,
        fast-forward)."""
        if num_steps < 0 or num_steps > self.steps_left:
            raise ValueError(f"advance({num_steps}): interval {self._t} has {self.steps_left} "
                             f"steps left")
        self._position += num_steps * self.global_batch_size

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Plain python state: enough to rebuild the current interval and resume inside it."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "domain_sizes": self.sizes.tolist(),
            "current_interval": self._t,
            "weights": None if self._weights is None else [float(x) for x in self._weights],
            "num_steps": self._num_steps,
            "cursor_epoch_at_start": self._start_epoch.tolist(),
            "cursor_pos_at_start": self._start_pos.tolist(),
            "consumed_before": self._consumed_before.tolist(),
            "position": self._position,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore state_dict(): rebuilds the current interval, continues at the same batch."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"mixture state version {state.get('version')} is not "
                             f"{STATE_VERSION}: the checkpoint is from another release")
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                          ("domain_sizes", self.sizes.tolist())):
            if state[key] != mine:
                raise ValueError(f"checkpoint mixture {key}={state[key]} differs from this run's "
                                 f"{mine}: resuming would change the sample stream; use the same "
                                 f"train.seed, train.global_batch_size and data")
        self._perm_cache.clear()
        self._t = int(state["current_interval"])
        self._epoch = np.asarray(state["cursor_epoch_at_start"], dtype=np.int64)
        self._pos = np.asarray(state["cursor_pos_at_start"], dtype=np.int64)
        self._start_epoch, self._start_pos = self._epoch.copy(), self._pos.copy()
        self._consumed_before = np.asarray(state["consumed_before"], dtype=np.int64)
        self._weights, self._num_steps = None, state["num_steps"]
        self._domains = np.zeros(0, dtype=np.int64)
        self._samples = np.zeros(0, dtype=np.int64)
        self._position = 0
        if state["weights"] is not None:
            self._weights = np.asarray(state["weights"], dtype=np.float64)
            self._build(self._weights, int(self._num_steps))
            self._position = int(state["position"])


def micro_batches_for_rank(global_batch: Sequence[Entry], dp_rank: int, dp_size: int,
                           micro_batch_size: int) -> List[List[Entry]]:
    """This data-parallel rank's micro-batches of a global batch (Megatron's convention).

    Rank r takes the contiguous slice [r * gbs / dp, (r + 1) * gbs / dp) and splits it into
    micro-batches of micro_batch_size, in order.
    """
    gbs = len(global_batch)
    if dp_size < 1 or not 0 <= dp_rank < dp_size or micro_batch_size < 1:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}, micro_batch_size="
                         f"{micro_batch_size}: need 0 <= dp_rank < dp_size and sizes >= 1")
    if gbs % (dp_size * micro_batch_size):
        raise ValueError(f"train.global_batch_size={gbs} is not a multiple of "
                         f"micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
    per_rank = gbs // dp_size
    mine = list(global_batch[dp_rank * per_rank:(dp_rank + 1) * per_rank])
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def collate(entries: Sequence[Entry], datasets: Sequence[Any]) -> Dict[str, torch.Tensor]:
    """Read entries from the per-domain training datasets and stack them.

    Returns {tokens [b, s] int64, labels [b, s] int64, loss_mask [b, s] float32,
    position_ids [b, s] int64, domain_id [b] int64, sample_id [b] int64}; no attention mask
    (the model builds causal masks itself).
    """
    samples = [datasets[d][s] for d, s in entries]
    out = {key: torch.stack([torch.as_tensor(x[key]) for x in samples])
           for key in ("tokens", "labels", "loss_mask", "position_ids")}
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    out["domain_id"] = torch.tensor([d for d, _ in entries], dtype=torch.int64)
    out["sample_id"] = torch.tensor([s for _, s in entries], dtype=torch.int64)
    return out
