"""DDKController: per-domain losses in, the next interval's mixture weights out (Algorithm 1).

The training loop calls `next_weights` at step 0 and after every K = ddk.interval steps with the
student's per-domain mean validation CE losses (and, once, the teacher's: the teacher is frozen,
so its losses are cached here and stored in the checkpoint). The controller applies the policy
(policies.py), then the optional weight floor / cap and repetition cap (math.bound_weights), and
appends one history record per interval. It is deterministic (no randomness), so every rank that
feeds it the same losses gets bit-identical weights, and its state_dict() is plain python data
(lists, floats, ints, str) that a checkpoint stores and compares exactly.

History record keys (one dict per interval t, written when t's weights are chosen):
    interval, step, weights (used for interval t), r (policy output before the bounds),
    loss_student, loss_teacher, ppl_student, ppl_teacher, ratio (ppl_S / ppl_T),
    samples_consumed, tokens_consumed, epochs (per domain, cumulative up to the start of t)
Entries that were not measured are None.

Must not import torch, torch.distributed or do I/O.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from megatron_ddk.config.schema import DDKConfig
from megatron_ddk.ddk.math import (
    MAX_LOG_RATIO,
    bound_weights,
    discrepancy_factor_from_ratio,
    normalize_weights,
    perplexity_ratio,
    repetition_upper_bounds,
)
from megatron_ddk.ddk.policies import ADAPTIVE_POLICIES, get_policy

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def _floats(arr) -> Optional[List[float]]:
    return None if arr is None else [float(x) for x in np.asarray(arr, dtype=np.float64)]


def _ints(arr) -> Optional[List[int]]:
    return None if arr is None else [int(x) for x in np.asarray(arr)]


def _ppl(losses: Optional[np.ndarray]) -> Optional[List[float]]:
    return None if losses is None else _floats(np.exp(np.minimum(losses, MAX_LOG_RATIO)))


class DDKController:
    """Chooses the domain mixture of every interval.

    Args:
        config: the run's DDKConfig (policy, alpha, initial_weights, static_weights, floor, cap,
            max_epochs_per_domain).
        domain_names: domain names in manifest order.
        natural_weights: token shares of the domains (static's default, initial 'natural').
        manifest_weights: each domain's initial_weight from the manifest (initial 'manifest').
        samples_per_epoch: training samples in one pass over each domain; needed for epochs in the
            history and for the repetition cap.
        samples_per_interval: K x global_batch_size; with it the repetition cap also limits the
            coming interval, so no domain ever passes max_epochs_per_domain.
    """

    def __init__(self, config: DDKConfig, domain_names: Sequence[str], natural_weights,
                 manifest_weights: Optional[Sequence[Optional[float]]] = None,
                 samples_per_epoch: Optional[Sequence[int]] = None,
                 samples_per_interval: Optional[int] = None) -> None:
        self.config = config
        self.domain_names = [str(n) for n in domain_names]
        self.num_domains = len(self.domain_names)
        self._policy = get_policy(config.policy)
        self.natural_weights = normalize_weights(natural_weights, "natural_weights")
        if self.natural_weights.size != self.num_domains:
            raise ValueError(f"natural_weights has {self.natural_weights.size} entries for "
                             f"{self.num_domains} domains {self.domain_names}")
        self.static_weights = None
        if config.policy == "static":
            given = config.static_weights
            if given is not None and len(given) != self.num_domains:
                raise ValueError(f"ddk.static_weights has {len(given)} entries but the manifest "
                                 f"has {self.num_domains} domains {self.domain_names}")
            self.static_weights = (self.natural_weights if given is None
                                   else normalize_weights(given, "ddk.static_weights"))
        self.manifest_weights = manifest_weights
        self.samples_per_epoch = (None if samples_per_epoch is None
                                  else np.asarray(samples_per_epoch, dtype=np.int64))
        if self.samples_per_epoch is not None and (self.samples_per_epoch.size != self.num_domains
                                                   or np.any(self.samples_per_epoch <= 0)):
            raise ValueError(f"samples_per_epoch={self.samples_per_epoch.tolist()}: need one "
                             f"positive count per domain ({self.num_domains})")
        self.samples_per_interval = samples_per_interval
        if config.max_epochs_per_domain is not None and self.samples_per_epoch is None:
            raise ValueError("ddk.max_epochs_per_domain is set: the controller needs "
                             "samples_per_epoch (training samples per domain)")
        self._teacher_losses: Optional[np.ndarray] = None
        self._weights: Optional[np.ndarray] = None
        self._r: Optional[np.ndarray] = None
        self._interval = -1
        self.history: List[Dict[str, Any]] = []

    # ----------------------------------------------------------------------------- queries
    @property
    def interval(self) -> int:
        """Index of the interval whose weights were chosen last (-1 before the first)."""
        return self._interval

    @property
    def weights(self) -> Optional[np.ndarray]:
        """The current interval's mixture (None before the first next_weights)."""
        return None if self._weights is None else self._weights.copy()

    @property
    def teacher_losses(self) -> Optional[np.ndarray]:
        """Cached per-domain teacher validation losses (None until set)."""
        return None if self._teacher_losses is None else self._teacher_losses.copy()

    def needs_losses(self) -> bool:
        """Whether the coming next_weights call uses the losses (else they are only recorded)."""
        if self.config.policy not in ADAPTIVE_POLICIES:
            return False
        return self._interval >= 0 or self.config.initial_weights == "eq1"

    # ----------------------------------------------------------------------------- updates
    def set_teacher_losses(self, losses) -> None:
        """Cache the teacher's per-domain mean validation CE (computed once: it is frozen)."""
        arr = np.asarray(losses, dtype=np.float64)
        if arr.shape != (self.num_domains,) or not np.all(np.isfinite(arr)):
            raise ValueError(f"teacher losses {arr.tolist()}: need {self.num_domains} finite "
                             f"values, one per domain {self.domain_names}")
        self._teacher_losses = arr

    def next_weights(self, step: int, student_losses=None, teacher_losses=None,
                     samples_consumed=None, tokens_consumed=None) -> np.ndarray:
        """Choose the mixture of the next interval and record it.

        Args:
            step: optimizer step at which the interval starts.
            student_losses: per-domain mean validation CE of the student (nats), measured now.
            teacher_losses: the teacher's; cached on first use (later calls may omit them).
            samples_consumed / tokens_consumed: per-domain cumulative training consumption.
        Returns:
            The weights (float64, sums to 1) to sample interval `interval` with.
        """
        if teacher_losses is not None:
            self.set_teacher_losses(teacher_losses)
        ls = None if student_losses is None else np.asarray(student_losses, dtype=np.float64)
        ratio = None
        if ls is not None and self._teacher_losses is not None:
            ratio = perplexity_ratio(ls, self._teacher_losses)
        if self.needs_losses() and ratio is None:
            raise ValueError(f"policy {self.config.policy!r} (interval {self._interval + 1}) "
                             f"needs student losses and cached teacher losses")
        if self._interval < 0:
            r = self._initial(ratio)
        else:
            r = self._policy(self._weights, ratio, self.config.alpha, self.static_weights)
        consumed = None if samples_consumed is None else np.asarray(samples_consumed, np.int64)
        epochs = None
        if consumed is not None and self.samples_per_epoch is not None:
            epochs = consumed / self.samples_per_epoch
        weights = self._bounded(r, epochs)
        self._interval += 1
        self._r, self._weights = r, weights
        lt = self._teacher_losses
        self.history.append({
            "interval": self._interval,
            "step": int(step),
            "weights": _floats(weights),
            "r": _floats(r),
            "loss_student": _floats(ls),
            "loss_teacher": _floats(lt),
            "ppl_student": _ppl(ls),
            "ppl_teacher": _ppl(lt),
            "ratio": _floats(ratio),
            "samples_consumed": _ints(consumed),
            "tokens_consumed": _ints(tokens_consumed),
            "epochs": _floats(epochs),
        })
        logger.info("ddk interval %d (step %d): weights %s", self._interval, step,
                    ", ".join(f"{n}={w:.4f}" for n, w in zip(self.domain_names, weights)))
        return weights.copy()

    def _initial(self, ratio: Optional[np.ndarray]) -> np.ndarray:
        """r_0: the policy's fixed mixture, or for ddk policies the configured initial rule."""
        policy, rule = self.config.policy, self.config.initial_weights
        uniform = np.full(self.num_domains, 1.0 / self.num_domains)
        if policy == "equal":
            return uniform
        if policy == "static":
            return self.static_weights.copy()
        if rule == "eq1":
            return discrepancy_factor_from_ratio(ratio)
        if rule == "natural":
            return self.natural_weights.copy()
        if rule == "uniform":
            return uniform
        mw = self.manifest_weights
        if mw is None or len(mw) != self.num_domains or any(x is None for x in mw):
            raise ValueError("ddk.initial_weights='manifest' needs an initial_weight for every "
                             f"domain in the manifest; got {mw}")
        return normalize_weights(mw, "manifest initial_weight")

    def _bounded(self, r: np.ndarray, epochs: Optional[np.ndarray]) -> np.ndarray:
        """r with the weight floor / cap and the repetition cap applied (r itself if none)."""
        cfg = self.config
        if (cfg.weight_floor, cfg.weight_cap, cfg.max_epochs_per_domain) == (None, None, None):
            return r.copy()
        lower = np.full(self.num_domains, cfg.weight_floor or 0.0)
        upper = np.full(self.num_domains, 1.0 if cfg.weight_cap is None else cfg.weight_cap)
        if cfg.max_epochs_per_domain is not None:
            if epochs is None:
                if self._interval >= 0:
                    raise ValueError("ddk.max_epochs_per_domain is set: next_weights needs "
                                     "samples_consumed after the first interval")
                epochs = np.zeros(self.num_domains)
            per = (None if self.samples_per_interval is None
                   else self.samples_per_interval / self.samples_per_epoch)
            rep = repetition_upper_bounds(epochs, cfg.max_epochs_per_domain, per)
            # A hair under a partial budget, so largest-remainder rounding stays inside it.
            rep = np.where(rep < 1.0, rep * (1.0 - 1e-9), rep)
            if rep[r > 0].sum() < 1.0:
                raise ValueError(
                    f"ddk.max_epochs_per_domain={cfg.max_epochs_per_domain}: at interval "
                    f"{self._interval + 1} the domains' remaining passes (epochs used "
                    f"{np.round(epochs, 4).tolist()}) cannot fill another interval; raise the "
                    f"cap or shorten the run")
            if np.minimum(upper, rep)[r > 0].sum() < 1.0:
                logger.warning("ddk.weight_cap=%s cannot hold with the domains left under "
                               "ddk.max_epochs_per_domain; it is lifted for interval %d",
                               cfg.weight_cap, self._interval + 1)
                upper = rep
            else:
                upper = np.minimum(upper, rep)
        return bound_weights(r, lower, upper)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Plain python state (lists, floats, ints, str): checkpoint it, compare it exactly."""
        return {
            "version": STATE_VERSION,
            "domain_names": list(self.domain_names),
            "policy": self.config.policy,
            "interval": self._interval,
            "weights": _floats(self._weights),
            "r": _floats(self._r),
            "teacher_losses": _floats(self._teacher_losses),
            "history": [dict(rec) for rec in self.history],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what state_dict() returned; ValueError if the domains differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"DDK controller state version {state.get('version')} is not "
                             f"{STATE_VERSION}: the checkpoint is from another release")
        if list(state["domain_names"]) != self.domain_names:
            raise ValueError(f"checkpoint domains {state['domain_names']} differ from the "
                             f"manifest's {self.domain_names}; resume with the same manifest")
        if state["policy"] != self.config.policy:
            logger.warning("resuming a %r run with ddk.policy=%r", state["policy"],
                           self.config.policy)
        as_arr = (lambda v: None if v is None else np.asarray(v, dtype=np.float64))
        self._interval = int(state["interval"])
        self._weights = as_arr(state["weights"])
        self._r = as_arr(state["r"])
        self._teacher_losses = as_arr(state["teacher_losses"])
        self.history = [dict(rec) for rec in state["history"]]
