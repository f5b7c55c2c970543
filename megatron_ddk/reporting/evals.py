"""Eval result files (`megatron-ddk eval --output`): reading them, and refusing to compare two
that were not made on the same samples.

    {"format": 3, "checkpoint", "iteration", "split": "test", "seq_length": 256,
     "fingerprint": "sha256:...", "samples_requested": null, "manifest": "...",
     "domains": {name: {"loss", "ppl", "tokens", "samples", "fingerprint",
                        "sample_losses", "sample_tokens"}}}

Formats 2 and 3 load; format 2 has no per-sample lists (sample_losses: each sample's mean CE in
sample order, null for a sample without a scored token; sample_tokens: its scored tokens), which
only the report's fidelity check needs.

Two results are comparable when their split, seq_length, and every domain's sample count and
sample fingerprint (sha256 of the exact token windows) agree; otherwise check_same_samples
raises ValueError naming the file and the field. A result without these fields (written before
`megatron-ddk eval --split`) cannot be checked and is refused with what to do.

Must not import torch or megatron_ddk.training.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


@dataclass
class EvalResult:
    """One `megatron-ddk eval` result file."""

    name: str
    """Column name in the report (teacher, student_before, CPT, KD, DDK, ...)."""
    path: str
    """The JSON file it was read from."""
    domains: List[str]
    """Domain names in file order."""
    loss: Dict[str, float]
    """Mean held-out CE (nats) per domain."""
    ppl: Dict[str, float]
    """Perplexity per domain (exp of loss when the file has no ppl)."""
    tokens: Dict[str, int]
    """Evaluated tokens per domain (the weights of the token-weighted mean)."""

    split: str = ""
    """The held-out split evaluated: test (reports) or valid (DDK's steering set)."""

    seq_length: int = 0
    """Tokens per evaluated sample."""

    samples: Dict[str, int] = field(default_factory=dict)
    """Evaluated samples per domain."""

    fingerprints: Dict[str, str] = field(default_factory=dict)
    """Per domain: sha256 of the exact token windows evaluated."""

    sample_losses: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    """Per domain: each sample's mean CE in sample order (None: no scored token); empty for a
    format-2 file."""

    sample_tokens: Dict[str, List[int]] = field(default_factory=dict)
    """Per domain: each sample's scored tokens (empty when the file records none)."""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


_EVAL_SPLITS = ("valid", "test")
FORMATS = (2, 3)
"""Result formats load_eval reads (training/evaluation_command.RESULT_FORMAT writes the last)."""
COMPARED_FIELDS = ("split", "seq_length", "samples", "fingerprint")
"""What two eval results must share to be compared (per domain for the last two)."""


def _eval_provenance(path: str, data: Dict[str, Any], res: "EvalResult") -> None:
    """Fill split / seq_length / samples / fingerprints; ValueError when they are missing."""
    missing = [k for k in ("split", "seq_length") if k not in data]
    missing += [f"domains.{d}.{k}" for d, v in data["domains"].items()
                for k in ("samples", "fingerprint") if not v.get(k)]
    if missing:
        raise ValueError(f"{path}: records no {', '.join(missing[:4])}"
                         + (" ..." if len(missing) > 4 else "") + ": it cannot be checked to be "
                         "on the same samples as the other evaluations (a result written before "
                         "`megatron-ddk eval --split`?); re-run megatron-ddk eval on the "
                         "checkpoint")
    if data["split"] not in _EVAL_SPLITS:
        raise ValueError(f"{path}: split: expected one of {list(_EVAL_SPLITS)}, got "
                         f"{data['split']!r}")
    res.split = data["split"]
    res.seq_length = int(_number(data["seq_length"], f"{path}: seq_length"))
    for dom, vals in data["domains"].items():
        res.samples[dom] = int(_number(vals["samples"], f"{path}: domains.{dom}.samples"))
        res.fingerprints[dom] = str(vals["fingerprint"])


def _per_sample(path: str, data: Dict[str, Any], res: "EvalResult") -> None:
    """Fill sample_losses / sample_tokens where the file has them (one entry per sample)."""
    for dom, vals in data["domains"].items():
        for key, target in (("sample_losses", res.sample_losses),
                            ("sample_tokens", res.sample_tokens)):
            values = vals.get(key)
            if values is None:
                continue
            where = f"{path}: domains.{dom}.{key}"
            if not isinstance(values, list) or len(values) != res.samples[dom]:
                raise ValueError(f"{where}: expected a list of {res.samples[dom]} values (one "
                                 f"per sample), got {type(values).__name__} of "
                                 f"{len(values) if isinstance(values, list) else '?'}")
            if key == "sample_losses":
                target[dom] = [None if v is None else _number(v, f"{where}[{i}]")
                               for i, v in enumerate(values)]
            else:
                target[dom] = [int(_number(v, f"{where}[{i}]")) for i, v in enumerate(values)]


def load_eval(path: str, name: str) -> EvalResult:
    """Read one eval result JSON (the output of `megatron-ddk eval --output`)."""
    if not os.path.isfile(path):
        raise ValueError(f"eval result {path} (for {name!r}) does not exist; write it with "
                         f"`megatron-ddk eval --config RUN.yaml --load CKPT --output {path}`")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    domains = data.get("domains") if isinstance(data, dict) else None
    if not isinstance(domains, dict) or not domains:
        raise ValueError(f"{path}: expected an object with a non-empty 'domains' mapping "
                         f"(the output of `megatron-ddk eval`)")
    if "format" in data and data["format"] not in FORMATS:
        raise ValueError(f"{path}: format {data['format']!r} is not one of {list(FORMATS)} (a "
                         f"result of another release); re-run megatron-ddk eval on the "
                         f"checkpoint")
    res = EvalResult(name=name, path=path, domains=[str(d) for d in domains], loss={}, ppl={},
                     tokens={})
    for dom, vals in domains.items():
        where = f"{path}: domains.{dom}"
        if not isinstance(vals, dict) or ("ppl" not in vals and "loss" not in vals):
            raise ValueError(f"{where}: expected {{'loss', 'ppl', 'tokens'}}, got {vals!r}")
        loss = _number(vals["loss"], where + ".loss") if "loss" in vals else None
        ppl = _number(vals["ppl"], where + ".ppl") if "ppl" in vals else math.exp(loss)
        res.ppl[dom] = ppl
        res.loss[dom] = loss if loss is not None else math.log(ppl)
        res.tokens[dom] = int(_number(vals.get("tokens", 1), where + ".tokens"))
    _eval_provenance(path, data, res)
    _per_sample(path, data, res)
    return res


def check_same_samples(evals: Sequence[EvalResult]) -> None:
    """ValueError naming the eval file and the field when two evaluations were not made on the
    same samples (split, seq_length, per-domain sample count and fingerprint)."""
    ref = evals[0]
    for e in evals[1:]:
        diffs = [(k, getattr(e, k), getattr(ref, k)) for k in ("split", "seq_length")
                 if getattr(e, k) != getattr(ref, k)]
        for d in ref.domains:
            if e.samples.get(d) != ref.samples.get(d):
                diffs.append((f"domains.{d}.samples", e.samples.get(d), ref.samples.get(d)))
            elif e.fingerprints.get(d) != ref.fingerprints.get(d):
                diffs.append((f"domains.{d}.fingerprint (same count, other tokens: another "
                              "manifest or rebuilt datasets?)", e.fingerprints.get(d),
                              ref.fingerprints.get(d)))
        if diffs:
            field_, mine, theirs = diffs[0]
            more = f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else ""
            raise ValueError(
                f"{e.path} ({e.name}) was evaluated on other samples than {ref.path} "
                f"({ref.name}): {field_} is {mine!r} there but {theirs!r} here{more}; evaluate "
                "every checkpoint with the same --split, --samples and data.seq_length")


