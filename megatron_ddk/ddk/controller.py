"""DDKController: per-domain losses in, the next interval's mixture weights out (Algorithm 1).

Algorithm 1 as this controller runs it (docs/ddk.md):

    interval 0 (step 0)   ratio_0 measured before the first step (validation signal)
                          r_0 = Eq. 1(ratio_0)   (training signal: nothing measured yet, r_0 = 1/N)
                          D_0 sampled with ddk.initial_sampling (natural: the paper's "randomly")
    interval t (step tK)  ratio_t measured; r_t = policy(r_{t-1}, ratio_t)
                          (ddk: Eq. 2, so the first update is psi_1 = r_0 * exp(ratio_1);
                          ddk_no_smoothing: Eq. 1); D_t sampled with bounds(r_t)

Two things are kept apart: r (Eq. 2's history, never bounded) and the weights an interval samples
with (the initial sampling at t = 0, r_t afterwards, then the optional floor / cap / repetition
cap). ratio_t[i] = ppl_S[i] / ppl_T[i] = exp(loss_S[i] - loss_T[i]) comes from the validation
sets (the teacher's losses are cached: it is frozen) or, with ddk.signal: training, from the
interval's own training batches; there a domain that got no tokens keeps its previous ratio
("carried"), or, before it was ever measured, the mean of the measured ratios ("mean").

The controller is deterministic (no randomness): every rank that feeds it the same losses gets
bit-identical weights. Its state_dict() is plain python data a checkpoint stores and compares.

History record keys (one dict per interval t, written when t's weights are chosen):
    interval, step, policy, alpha, signal
    ratio, ratio_source     the ratio r_t was computed from; per domain measured | carried | mean
    r                       the policy's vector before any bound (interval 0: r_0, or the fixed
                            mixture of equal / static)
    weights                 the weights interval t samples with
    loss_student, loss_teacher, ppl_student, ppl_teacher   the measurement (None: not measured)
    signal_tokens           training signal: tokens per domain behind the means
    ratio_log_se            per domain, the standard error of log(ratio) from the paired per-sample
                            losses of the validation sets (ddk/math.paired_log_ratio); None when
                            no per-sample losses exist (training signal, offline teacher store)
    ratio_ci95              per domain [lo, hi], the ratio's 95% t interval; None likewise
    samples_consumed, tokens_consumed, epochs   per domain, cumulative up to the start of t
    interval 0 only: r0, r0_source (eq1 | uniform | None for equal / static), initial_sampling

Must not import torch, torch.distributed or do I/O.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ddk.config.schema import DDKConfig
from megatron_ddk.ddk.math import (
    MAX_LOG_RATIO,
    bound_weights,
    discrepancy_factor_from_ratio,
    normalize_weights,
    paired_log_ratio,
    perplexity_ratio,
    ratio_interval,
    repetition_upper_bounds,
)
from megatron_ddk.ddk.policies import ADAPTIVE_POLICIES, get_policy

logger = logging.getLogger(__name__)

STATE_VERSION = 3
"""3: the teacher's per-sample validation losses are kept too; 2 (without them) still loads."""

_LOADABLE_VERSIONS = (2, 3)

REMOVED_INITIAL_WEIGHTS = (
    "ddk.initial_weights={value!r} was removed: write ddk.initial_sampling (natural | uniform | "
    "eq1 | manifest) for interval 0's data; Eq. 2's prior r_0 is always Eq. 1 (docs/ddk.md)")


def _floats(arr) -> Optional[List[Optional[float]]]:
    """Plain floats; non-finite entries (a domain not measured) become None (valid JSON)."""
    if arr is None:
        return None
    return [float(x) if np.isfinite(x) else None for x in np.asarray(arr, dtype=np.float64)]


def _ints(arr) -> Optional[List[int]]:
    return None if arr is None else [int(x) for x in np.asarray(arr)]


def _ppl(losses: Optional[np.ndarray]) -> Optional[List[Optional[float]]]:
    return None if losses is None else _floats(np.exp(np.minimum(losses, MAX_LOG_RATIO)))


class DDKController:
    """Chooses the domain mixture of every interval.

    Args:
        config: the run's DDKConfig (policy, alpha, signal, initial_sampling, static_weights,
            floor, cap, max_epochs_per_domain).
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
        if getattr(config, "initial_weights", None) is not None:
            raise ValueError(REMOVED_INITIAL_WEIGHTS.format(value=config.initial_weights))
        if config.signal not in ("validation", "training"):
            raise ValueError(f"ddk.signal={config.signal!r}: use 'validation' or 'training'")
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
        self._teacher_samples: Optional[List[np.ndarray]] = None
        self._weights: Optional[np.ndarray] = None
        self._r: Optional[np.ndarray] = None
        self._r0: Optional[np.ndarray] = None
        self._ratio: Optional[np.ndarray] = None
        self._interval = -1
        self.history: List[Dict[str, Any]] = []

    # ----------------------------------------------------------------------------- queries
    @property
    def interval(self) -> int:
        """Index of the interval whose weights were chosen last (-1 before the first)."""
        return self._interval

    @property
    def weights(self) -> Optional[np.ndarray]:
        """The current interval's sampling weights (None before the first next_weights)."""
        return None if self._weights is None else self._weights.copy()

    @property
    def r(self) -> Optional[np.ndarray]:
        """The current factor r_t of Eq. 2 (before bounds; None before the first call)."""
        return None if self._r is None else self._r.copy()

    @property
    def teacher_losses(self) -> Optional[np.ndarray]:
        """Cached per-domain teacher validation losses (None until set)."""
        return None if self._teacher_losses is None else self._teacher_losses.copy()

    @property
    def adaptive(self) -> bool:
        """Whether the policy's weights depend on the student / teacher losses."""
        return self.config.policy in ADAPTIVE_POLICIES

    def needs_validation(self) -> bool:
        """Whether the coming next_weights call needs a validation measurement: adaptive policy
        and signal 'validation', at every interval including 0 (r_0 = Eq. 1 before step 1)."""
        return self.adaptive and self.config.signal == "validation"

    def needs_ratio(self) -> bool:
        """Whether the coming next_weights call cannot be made without losses."""
        if not self.adaptive:
            return False
        return self.config.signal == "validation" or self._interval >= 0

    # ----------------------------------------------------------------------------- updates
    def set_teacher_losses(self, losses, sample_losses=None) -> None:
        """Cache the teacher's per-domain mean validation CE (computed once: it is frozen), and
        its per-sample losses (per domain, sample order) when given."""
        arr = np.asarray(losses, dtype=np.float64)
        if arr.shape != (self.num_domains,) or not np.all(np.isfinite(arr)):
            raise ValueError(f"teacher losses {arr.tolist()}: need {self.num_domains} finite "
                             f"values, one per domain {self.domain_names}")
        self._teacher_losses = arr
        self._teacher_samples = self._per_sample(sample_losses, "teacher sample losses")

    def _per_sample(self, values, name: str) -> Optional[List[np.ndarray]]:
        if values is None:
            return None
        if len(values) != self.num_domains:
            raise ValueError(f"{name}: {len(values)} domains given, need one list per domain "
                             f"{self.domain_names}")
        return [np.asarray(v, dtype=np.float64).ravel().copy() for v in values]

    def next_weights(self, step: int, student_losses=None, teacher_losses=None,
                     samples_consumed=None, tokens_consumed=None,
                     signal_tokens=None, student_sample_losses=None,
                     teacher_sample_losses=None, sample_tokens=None) -> np.ndarray:
        """Choose the mixture of the next interval and record it.

        Args:
            step: optimizer step at which the interval starts.
            student_losses: per-domain mean CE of the student (nats): on the validation sets,
                measured now, or (signal 'training') over the interval that just ended, NaN for
                a domain with no tokens in it.
            teacher_losses: the teacher's; validation: cached on first use (later calls may omit
                them); training: the interval's, given at every call after the first.
            samples_consumed / tokens_consumed: per-domain cumulative training consumption.
            signal_tokens: training signal: tokens per domain behind the means (recorded).
            student_sample_losses / teacher_sample_losses / sample_tokens: validation signal,
                per domain the per-sample mean CE (sample order, the same samples for both) and
                scored tokens; they give ratio_log_se / ratio_ci95. The teacher's are cached
                with its losses. Without them those fields are None.
        Returns:
            The weights (float64, sums to 1) to sample interval `interval` with.
        """
        ls, lt, ratio, source = self._measure(student_losses, teacher_losses,
                                              teacher_sample_losses)
        se, ci = self._ratio_spread(ratio, student_sample_losses, sample_tokens)
        extra: Dict[str, Any] = {}
        if self._interval < 0:
            r, sample_from, extra = self._interval0(ratio)
        else:
            r = self._policy(self._r, ratio, self.config.alpha, self.static_weights)
            sample_from = r
        consumed = None if samples_consumed is None else np.asarray(samples_consumed, np.int64)
        epochs = None
        if consumed is not None and self.samples_per_epoch is not None:
            epochs = consumed / self.samples_per_epoch
        weights = self._bounded(sample_from, epochs)
        self._interval += 1
        self._r, self._weights = r, weights
        if ratio is not None:
            self._ratio = ratio
        self.history.append(dict({
            "interval": self._interval, "step": int(step), "policy": self.config.policy,
            "alpha": float(self.config.alpha), "signal": self.config.signal,
            "ratio": _floats(ratio), "ratio_source": source,
            "ratio_log_se": se, "ratio_ci95": ci,
            "r": _floats(r), "weights": _floats(weights),
            "loss_student": _floats(ls), "loss_teacher": _floats(lt),
            "ppl_student": _ppl(ls), "ppl_teacher": _ppl(lt),
            "signal_tokens": _floats(signal_tokens),
            "samples_consumed": _ints(consumed), "tokens_consumed": _ints(tokens_consumed),
            "epochs": _floats(epochs),
        }, **extra))
        logger.info("ddk interval %d (step %d, %s signal): weights %s", self._interval, step,
                    self.config.signal,
                    ", ".join(f"{n}={w:.4f}" for n, w in zip(self.domain_names, weights)))
        return weights.copy()

    def _losses(self, values, name: str, allow_missing: bool) -> Optional[np.ndarray]:
        if values is None:
            return None
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (self.num_domains,):
            raise ValueError(f"{name} {arr.tolist()}: need one value per domain "
                             f"{self.domain_names}")
        bad = ~np.isfinite(arr) & ~(allow_missing & np.isnan(arr))
        if bad.any():
            raise ValueError(f"{name} {arr.tolist()}: not finite for domain(s) "
                             f"{[self.domain_names[i] for i in np.flatnonzero(bad)]}: the model "
                             f"or the measurement diverged")
        return arr

    def _measure(self, student_losses, teacher_losses, teacher_sample_losses=None
                 ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray],
                            Optional[List[str]]]:
        """(loss_S, loss_T, ratio, ratio_source) of this call; ratio None when not measured."""
        training = self.config.signal == "training"
        ls = self._losses(student_losses, "student losses", training)
        lt = self._losses(teacher_losses, "teacher losses", training)
        if not training:
            if lt is not None:
                self.set_teacher_losses(lt, teacher_sample_losses)
            lt = self._teacher_losses
        if ls is None or lt is None:
            if self.needs_ratio():
                raise ValueError(
                    f"policy {self.config.policy!r} with signal {self.config.signal!r} "
                    f"(interval {self._interval + 1}) needs student losses and teacher losses")
            return ls, lt, None, None
        measured = np.isfinite(ls) & np.isfinite(lt)
        if not measured.any():
            raise ValueError(f"no domain has a measured loss at interval {self._interval + 1} "
                             f"(student {ls.tolist()}, teacher {lt.tolist()})")
        ratio = np.full(self.num_domains, np.nan)
        ratio[measured] = perplexity_ratio(ls[measured], lt[measured])
        source = ["measured" if m else "carried" for m in measured]
        for i in np.flatnonzero(~measured):
            previous = None if self._ratio is None else self._ratio[i]
            if previous is None or not np.isfinite(previous):
                ratio[i], source[i] = float(np.mean(ratio[measured])), "mean"
            else:
                ratio[i] = previous
        return ls, lt, ratio, source

    def _ratio_spread(self, ratio: Optional[np.ndarray], student_samples, tokens
                      ) -> Tuple[Optional[List[Optional[float]]],
                                 Optional[List[Optional[List[float]]]]]:
        """(ratio_log_se, ratio_ci95) per domain from the paired per-sample validation losses;
        (None, None) without them (training signal, offline teacher store, no measurement)."""
        student = self._per_sample(student_samples, "student sample losses")
        if ratio is None or student is None or self._teacher_samples is None:
            return None, None
        toks = self._per_sample(tokens, "sample tokens") or [None] * self.num_domains
        se: List[Optional[float]] = []
        ci: List[Optional[List[float]]] = []
        for name, s, t, w in zip(self.domain_names, student, self._teacher_samples, toks):
            if s.size != t.size:
                raise ValueError(f"domain {name}: {s.size} student validation samples but the "
                                 f"cached teacher losses are of {t.size}: the validation set "
                                 f"changed since they were measured (ddk.valid_samples_per_domain "
                                 f"or the manifest); start a new run")
            est = paired_log_ratio(s, t, w)
            interval = ratio_interval(est)
            se.append(est.se)
            ci.append(None if interval is None else list(interval))
        return se, ci

    def _interval0(self, ratio: Optional[np.ndarray]
                   ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """(r_0, what D_0 is sampled from, record fields) of interval 0."""
        policy, n = self.config.policy, self.num_domains
        uniform = np.full(n, 1.0 / n)
        if policy in ("equal", "static"):
            fixed = uniform if policy == "equal" else self.static_weights.copy()
            return fixed, fixed, {"r0": None, "r0_source": None, "initial_sampling": None}
        if ratio is None:  # training signal: nothing measured before step 1
            r0, r0_source = uniform, "uniform"
        else:
            r0, r0_source = discrepancy_factor_from_ratio(ratio), "eq1"
        self._r0 = r0
        rule = self.config.initial_sampling
        if rule == "natural":
            sample_from = self.natural_weights.copy()
        elif rule == "uniform":
            sample_from = uniform
        elif rule == "eq1":
            if r0_source != "eq1":
                raise ValueError("ddk.initial_sampling='eq1' needs r_0 from a measurement; with "
                                 "ddk.signal='training' nothing is measured before step 1: use "
                                 "initial_sampling natural or uniform")
            sample_from = r0.copy()
        elif rule == "manifest":
            mw = self.manifest_weights
            if mw is None or len(mw) != n or any(x is None for x in mw):
                raise ValueError("ddk.initial_sampling='manifest' needs an initial_weight for "
                                 f"every domain in the manifest; got {mw}")
            sample_from = normalize_weights(mw, "manifest initial_weight")
        else:
            raise ValueError(f"ddk.initial_sampling={rule!r}: use natural, uniform, eq1 or "
                             f"manifest")
        return r0, sample_from, {"r0": _floats(r0), "r0_source": r0_source,
                                 "initial_sampling": rule}

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
            "signal": self.config.signal,
            "interval": self._interval,
            "weights": _floats(self._weights),
            "r": _floats(self._r),
            "r0": _floats(self._r0),
            "ratio": _floats(self._ratio),
            "teacher_losses": _floats(self._teacher_losses),
            "teacher_sample_losses": None if self._teacher_samples is None
            else [_floats(a) for a in self._teacher_samples],
            "history": [dict(rec) for rec in self.history],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what state_dict() returned; ValueError if the domains or the signal differ."""
        if state.get("version") not in _LOADABLE_VERSIONS:
            raise ValueError(f"DDK controller state version {state.get('version')} is not one "
                             f"of {list(_LOADABLE_VERSIONS)}: the checkpoint is from another "
                             f"release (before r_0 and the sampling weights were kept apart); "
                             f"start a new run")
        if list(state["domain_names"]) != self.domain_names:
            raise ValueError(f"checkpoint domains {state['domain_names']} differ from the "
                             f"manifest's {self.domain_names}; resume with the same manifest")
        if state["signal"] != self.config.signal:
            raise ValueError(f"the checkpoint's run used ddk.signal={state['signal']!r}, this "
                             f"config {self.config.signal!r}; resume with the same signal")
        if state["policy"] != self.config.policy:
            logger.warning("resuming a %r run with ddk.policy=%r", state["policy"],
                           self.config.policy)

        def as_arr(v):
            return None if v is None else np.array([np.nan if x is None else x for x in v],
                                                   dtype=np.float64)

        self._interval = int(state["interval"])
        self._weights = as_arr(state["weights"])
        self._r = as_arr(state["r"])
        self._r0 = as_arr(state["r0"])
        self._ratio = as_arr(state["ratio"])
        self._teacher_losses = as_arr(state["teacher_losses"])
        samples = state.get("teacher_sample_losses")  # absent in version 2: no SEs after resume
        self._teacher_samples = None if samples is None else [as_arr(v) for v in samples]
        self.history = [dict(rec) for rec in state["history"]]
