"""Steering fidelity: does DDK's validation set measure what the test set measures?

DDK steers on per-domain ratios ppl_S / ppl_T of the valid split; reports judge on the test
split. Before the first step both are measurements of the same two checkpoints (the starting
student, the teacher), so a domain's valid and test ratio differ only by what text the two sets
hold and by sampling noise. Inputs: the DDK run's interval-0 record (ratio, ratio_log_se,
ratio_ci95 from the valid split) and the test-split evals of student_before and teacher with
per-sample losses (eval format 3). Per domain:

    test ratio   exp(sum w_i d_i), d_i = CE_S_i - CE_T_i on test sample i (w_i: token shares),
                 its se and 95% t interval from ddk/math.paired_log_ratio / ratio_interval
    rel_diff     test / valid - 1              (flagged when |rel_diff| > AGREE_WITHIN)
    z            (log test - log valid) / sqrt(se_valid^2 + se_test^2)   (independent sets)
                 |z| > 1.96: they disagree beyond their 95% intervals

and over domains the Spearman rank correlation of the valid and test ratios (ties averaged).
Pure: no I/O, no plotting. Must not import torch, matplotlib or megatron_ddk.training.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from megatron_ddk.ddk.math import paired_log_ratio, ratio_interval
from megatron_ddk.reporting.evals import EvalResult

AGREE_WITHIN = 0.10
"""The acceptance criterion: valid and test ratio before the first step agree within 10%."""

Z_95 = 1.959964
"""Two-sided 95% normal quantile: |z| above it is a difference beyond sampling noise."""

ENLARGE = ("enlarge the held-out sets or spread them over more documents (build_domains "
           "--valid-samples / --test-samples, a lower --max-piece-bytes, a higher "
           "--min-heldout-documents)")


def average_ranks(values: Sequence[float]) -> List[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho: the Pearson correlation of the average ranks; None for fewer than two
    pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _at(rec: Dict[str, Any], key: str, i: int):
    values = rec.get(key)
    return None if values is None else values[i]


def domain_fidelity(name: str, valid_ratio: float, valid_se: Optional[float],
                    valid_ci: Optional[Sequence[float]], student: Sequence, teacher: Sequence,
                    tokens: Optional[Sequence[int]], no_se_reason: str) -> Dict[str, Any]:
    """One domain's row: valid vs test ratio, their difference, z and a plain-words verdict."""
    student = [math.nan if v is None else v for v in student]
    teacher = [math.nan if v is None else v for v in teacher]
    est = paired_log_ratio(student, teacher, tokens)
    test_ratio = math.exp(min(est.log_ratio, 700.0))
    rel = test_ratio / valid_ratio - 1.0
    z = None
    if valid_se is not None and est.se is not None and (valid_se ** 2 + est.se ** 2) > 0:
        z = (est.log_ratio - math.log(valid_ratio)) / math.sqrt(valid_se ** 2 + est.se ** 2)
    within = abs(rel) <= AGREE_WITHIN
    beyond = None if z is None else abs(z) > Z_95
    said = f"{name}: valid says {valid_ratio:.3g}, test says {test_ratio:.3g} ({rel:+.0%})"
    if within:
        status = "agree, beyond noise" if beyond else "agree"
        verdict = f"{name}: valid and test agree within 10% ({rel:+.1%})" + (
            "; the difference is beyond sampling noise, but small" if beyond else "")
    elif beyond:
        status = "differ beyond noise"
        verdict = (f"{said}, beyond their 95% intervals: the steering set measures different "
                   f"text than the test set; {ENLARGE}")
    elif beyond is None:
        status = "differ, noise unknown"
        verdict = f"{said}; {no_se_reason}, so sampling noise cannot be judged; {ENLARGE}"
    else:
        status = "differ within noise"
        verdict = (f"{said}, within sampling noise (|z| = {abs(z):.2f} < 1.96): the held-out "
                   f"sets are too small to resolve a 10% difference; {ENLARGE}")
    interval = ratio_interval(est)
    return {"valid_ratio": valid_ratio, "valid_log_se": valid_se,
            "valid_ci95": None if valid_ci is None else list(valid_ci),
            "test_ratio": test_ratio, "test_log_se": est.se,
            "test_ci95": None if interval is None else list(interval),
            "test_samples": est.num_samples, "rel_diff": rel, "z": z,
            "within_10pct": within, "beyond_noise": beyond, "status": status,
            "verdict": verdict}


def _unavailable(reason: str) -> Dict[str, Any]:
    return {"available": False, "reason": reason}


def _missing_inputs(rec: Optional[Dict[str, Any]], run_name: str, student: Optional[EvalResult],
                    teacher: Optional[EvalResult]) -> Optional[str]:
    """Why the check cannot be made from these inputs (None: it can)."""
    if rec is None:
        return f"the DDK run {run_name} recorded no interval 0"
    if rec.get("signal") != "validation" or rec.get("ratio") is None:
        return (f"the DDK run {run_name} (policy {rec.get('policy')}, signal "
                f"{rec.get('signal')}) measured no validation ratio before the first step: "
                "only an adaptive policy with ddk.signal validation steers on the valid split")
    for role, ev in (("student_before", student), ("teacher", teacher)):
        if ev is None:
            return f"no --eval named {role} (the same checkpoint the DDK run started from)"
        if ev.split != "test":
            return (f"the evaluations are on the {ev.split} split; the check compares the "
                    "valid split with the test split (evaluation.split: test)")
        if not ev.sample_losses:
            return (f"{ev.path} ({role}) records no per-sample losses (eval format 2); re-run "
                    "megatron-ddk eval, which writes sample_losses")
    missing = [d for d in rec.get("domains") or [] if d not in student.sample_losses
               or d not in teacher.sample_losses]
    if missing or not rec.get("domains"):
        return (f"the DDK run's domains {rec.get('domains')} are not all in the evals "
                f"(missing {missing}); evaluate on the run's manifest")
    return None


def fidelity_check(intervals: Sequence[Dict[str, Any]], run_name: str,
                   student: Optional[EvalResult], teacher: Optional[EvalResult],
                   run_config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The fidelity table of one DDK run (report.json's "fidelity"); {"available": False,
    "reason": ...} when its inputs do not exist."""
    rec = next((r for r in intervals if r.get("interval") == 0), None)
    reason = _missing_inputs(rec, run_name, student, teacher)
    if reason:
        return _unavailable(reason)
    store = ((run_config or {}).get("distill") or {}).get("teacher_logits")
    no_se = ("the DDK run's teacher came from an offline store, which holds no per-sample "
             "teacher losses" if store else "the DDK run recorded no ratio_log_se")
    per: Dict[str, Dict[str, Any]] = {}
    for i, name in enumerate(rec["domains"]):
        per[name] = domain_fidelity(
            name, float(rec["ratio"][i]), _at(rec, "ratio_log_se", i), _at(rec, "ratio_ci95", i),
            student.sample_losses[name], teacher.sample_losses[name],
            student.sample_tokens.get(name), no_se)
    names = list(per)
    rho = spearman([per[n]["valid_ratio"] for n in names], [per[n]["test_ratio"] for n in names])
    flagged = [n for n in names if not per[n]["within_10pct"]]
    if not flagged:
        summary = f"valid and test agree within 10% on every domain ({len(names)} domains)"
        small = [n for n in names if per[n]["beyond_noise"]]
        verdict = summary + ("" if not small else
                             f"; {', '.join(small)} differ beyond sampling noise, by less "
                             "than 10%")
    else:
        noise = [n for n in flagged if per[n]["beyond_noise"]]
        summary = (f"{len(flagged)} of {len(names)} domains differ by more than 10% "
                   f"({len(noise)} beyond sampling noise)")
        verdict = summary + ": " + " | ".join(per[n]["verdict"] for n in flagged)
    return {"available": True, "run": run_name, "step": int(rec.get("step", 0)),
            "domains": names, "per_domain": per, "spearman": rho, "flagged": flagged,
            "agree_within": AGREE_WITHIN, "summary": summary, "verdict": verdict}


def _ratio_ci(ratio: float, ci: Optional[Sequence[float]]) -> str:
    return f"{ratio:.3f}" + ("" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def fidelity_markdown(fid: Dict[str, Any]) -> List[str]:
    """The report's section (docs/report.md, "Steering fidelity")."""
    out = ["## Steering fidelity: does the valid set measure what the test set measures?", ""]
    if not fid.get("available"):
        return out + [f"Not available: {fid.get('reason')}.", ""]
    out += [f"The student/teacher perplexity ratio of the checkpoints DDK started from, on the "
            f"valid split ({fid['run']}'s interval-0 record: what DDK steered on) and on the "
            "test split (student_before and teacher evals), with 95% intervals.", ""]
    rows = []
    for name, p in fid["per_domain"].items():
        rows.append([name, _ratio_ci(p["valid_ratio"], p["valid_ci95"]),
                     _ratio_ci(p["test_ratio"], p["test_ci95"]), f"{100 * p['rel_diff']:+.1f}%",
                     "-" if p["z"] is None else f"{p['z']:+.2f}", p["status"]])
    header = ["domain", "valid ratio [95% CI]", "test ratio [95% CI]", "test/valid - 1", "z",
              "verdict"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    rho = fid["spearman"]
    out += ["", f"**Verdict:** {fid['summary']}" + (":" if fid["flagged"] else "."), ""]
    if fid["flagged"]:
        out += [f"- {fid['per_domain'][n]['verdict']}." for n in fid["flagged"]] + [""]
    out += ["Spearman rank correlation of the valid and test ratios over domains: "
            + ("undefined (fewer than two domains or constant ratios)" if rho is None
               else f"{rho:.3f}") + ".", ""]
    return out
