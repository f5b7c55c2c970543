"""Arms x seeds: means and 95% intervals over seeds, paired differences, the ablation table.

Input: the report's perplexity table (report.ppl_table) whose columns are `ARM@SEED` for the
arms and plain names for the references (teacher, student_before). Per arm and metric the
interval is the two-sided 95% Student-t interval of the mean over seeds,
mean +- t(0.975, n-1) * sd / sqrt(n); paired differences (e.g. DDK - KD) are taken seed by seed
(same seed = same data order of the continuation), then summarised the same way. With one seed
no interval exists (reported as None). Pure: no I/O, no plotting.

Two summaries of a column over domains: pooled_ppl, taken from the table (exp of the
token-weighted mean loss), and domain_avg_ppl, the paper's average: the arithmetic mean over
domains of each domain's perplexity. Every pair's difference is reported for both and for every
domain (ppl/DOMAIN), each with its verdict.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_ddk.ddk.math import t_critical


def mean_interval(values: Sequence[float]) -> Dict[str, Any]:
    """{"mean", "half_width", "low", "high", "n", "values"}; half_width None when n < 2."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = sum(vals) / n
    half = None
    if n >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_critical(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "half_width": half, "low": None if half is None else mean - half,
            "high": None if half is None else mean + half, "n": n, "values": vals}


def split_column(column: str) -> Tuple[str, Optional[int]]:
    """'DDK@1234' -> ('DDK', 1234); 'teacher' -> ('teacher', None)."""
    arm, sep, seed = column.rpartition("@")
    if sep and arm and seed.lstrip("-").isdigit():
        return arm, int(seed)
    return column, None


def arms_and_seeds(columns: Sequence[str]) -> Dict[str, Dict[int, str]]:
    """{arm: {seed: column}} for the ARM@SEED columns, arms in first-seen order."""
    out: Dict[str, Dict[int, str]] = {}
    for col in columns:
        arm, seed = split_column(col)
        if seed is not None:
            out.setdefault(arm, {})[seed] = col
    return out


def _metrics(table: Dict[str, Any], col: str, teacher: Optional[str]) -> Dict[str, float]:
    """One column's metrics: pooled_ppl, domain_avg_ppl, ppl/DOMAIN, worst_ratio (with a
    teacher)."""
    domains = table["domains"]
    ppl = table["ppl"][col]
    out = {"pooled_ppl": table["pooled_ppl"][col]}
    if domains:
        out["domain_avg_ppl"] = sum(ppl[d] for d in domains) / len(domains)
    for d in domains:
        out[f"ppl/{d}"] = ppl[d]
    if teacher is not None and domains:
        out["worst_ratio"] = max(ppl[d] / table["ppl"][teacher][d] for d in domains)
    return out


def difference_keys(domains: Sequence[str]) -> List[str]:
    """The metrics a paired difference is reported for, in table order."""
    return ["pooled_ppl"] + (["domain_avg_ppl"] if domains else []) + [f"ppl/{d}" for d in domains]


def summarize(table: Dict[str, Any], teacher: Optional[str] = "teacher",
              pairs: Sequence[Tuple[str, str]] = (("DDK", "KD"), ("DDK", "ES"), ("KD", "CPT"))
              ) -> Dict[str, Any]:
    """Per arm: mean and interval of every metric over seeds; paired differences (first -
    second, seed by seed) over the seeds two arms share, with each metric's verdict. Pairs
    naming an absent arm, or sharing no seed, are left out."""
    teacher = teacher if teacher in table["columns"] else None
    groups = arms_and_seeds(table["columns"])
    if not groups:
        return {"available": False, "reason": "no ARM@SEED columns"}
    per_col = {c: _metrics(table, c, teacher) for by_seed in groups.values()
               for c in by_seed.values()}
    arms: Dict[str, Any] = {}
    for arm, by_seed in groups.items():
        per_seed = [per_col[c] for _, c in sorted(by_seed.items())]
        arms[arm] = {"seeds": sorted(by_seed), "metrics": {
            k: mean_interval([m[k] for m in per_seed]) for k in per_seed[0]}}
    diffs = {}
    keys = difference_keys(table["domains"])
    for a, b in pairs:
        if a not in groups or b not in groups:
            continue
        shared = sorted(set(groups[a]) & set(groups[b]))
        if not shared:
            continue
        metrics = {k: mean_interval([per_col[groups[a][s]][k] - per_col[groups[b][s]][k]
                                     for s in shared]) for k in keys}
        diffs[f"{a}-{b}"] = {"first": a, "second": b, "seeds": shared, "metrics": metrics,
                             "verdicts": {k: interval_verdict(v) for k, v in metrics.items()}}
    return {"available": True, "domains": list(table["domains"]), "teacher": teacher,
            "arms": arms, "differences": diffs}


def interval_verdict(stat: Dict[str, Any]) -> str:
    """What a difference's interval allows one to say."""
    if stat["half_width"] is None:
        return "one seed: no interval"
    if stat["high"] < 0:
        return "lower (interval below 0)"
    if stat["low"] > 0:
        return "higher (interval above 0)"
    return "no difference resolved (interval contains 0)"


def excludes_zero(stat: Dict[str, Any]) -> bool:
    """True when the 95% interval exists and lies entirely on one side of 0."""
    return stat["half_width"] is not None and (stat["high"] < 0 or stat["low"] > 0)


def _fmt(stat: Dict[str, Any], digits: int = 2) -> str:
    if stat["half_width"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['half_width']:.{digits}f}"


def _fmt_marked(stat: Dict[str, Any]) -> str:
    """A difference's cell, bold where its interval excludes 0."""
    return f"**{_fmt(stat)}**" if excludes_zero(stat) else _fmt(stat)


def _metric_title(key: str) -> str:
    return {"pooled_ppl": "pooled", "domain_avg_ppl": "domain-averaged"}.get(
        key, key.partition("/")[2])


def _verdict_cells(diff: Dict[str, Any], key: str) -> str:
    """'mean ± half | FIRST verdict' for one metric of a paired difference."""
    if key not in diff["metrics"]:
        return "n/a | n/a"
    stat, verdict = diff["metrics"][key], diff["verdicts"][key]
    who = "" if stat["half_width"] is None else f"{diff['first']} "
    return f"{_fmt(stat)} | {who}{verdict}"


def _arms_markdown(study: Dict[str, Any]) -> List[str]:
    """Ablation-shaped table (pooled, domain-averaged, worst ratio) and the per-domain table."""
    domains, arms = study["domains"], study["arms"]
    n = sorted({len(a["seeds"]) for a in arms.values()})
    lines = ["## Arms over seeds (test split)", "",
             f"Mean ± 95% t-interval half-width over {'/'.join(str(x) for x in n)} "
             "seed(s) per arm; lower perplexity is better. Pooled: exp of the token-weighted "
             "mean loss; domain-averaged: the arithmetic mean of the domains' perplexities.", ""]
    if n[0] < 2:
        lines += ["With one seed no interval exists: those cells show the single value.", ""]
    head = ["arm", "seeds", "pooled test ppl", "domain-averaged test ppl"] + (
        ["worst-domain ppl ratio S/T"] if study["teacher"] else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, a in arms.items():
        m = a["metrics"]
        row = [arm, str(len(a["seeds"])), _fmt(m["pooled_ppl"]),
               _fmt(m["domain_avg_ppl"]) if "domain_avg_ppl" in m else "n/a"]
        if study["teacher"]:
            row.append(_fmt(m["worst_ratio"], 3))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per-domain test perplexity:", "",
              "| arm | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for arm, a in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_fmt(a["metrics"][f"ppl/{d}"])
                                                for d in domains) + " |")
    return lines


def _differences_markdown(study: Dict[str, Any]) -> List[str]:
    """Verdicts on the pooled and domain-averaged differences; one table of every pair's
    difference per domain."""
    diffs = study["differences"]
    if not diffs:
        return []
    lines = ["", "Paired differences (same seed, first arm - second arm), test perplexity:", "",
             "| difference | seeds | pooled | what it allows one to say | domain-averaged | "
             "what it allows one to say |", "|---|---|---|---|---|---|"]
    for name, d in diffs.items():
        cells = [_verdict_cells(d, k) for k in ("pooled_ppl", "domain_avg_ppl")]
        lines.append(f"| {name} | {len(d['seeds'])} | " + " | ".join(cells) + " |")
    keys = difference_keys(study["domains"])
    num = sum(len(d["seeds"]) >= 2 for d in diffs.values()) * len(study["domains"])
    chance = (f" {num} per-domain intervals: if no arm differed, about {num / 20:.1f} of them "
              "(1 in 20) would still exclude 0 by chance." if num else "")
    lines += ["", "Paired differences per domain (mean ± 95% interval; **bold**: the interval "
              f"excludes 0).{chance}", "",
              "| difference | seeds | " + " | ".join(_metric_title(k) for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for name, d in diffs.items():
        lines.append(f"| {name} | {len(d['seeds'])} | "
                     + " | ".join(_fmt_marked(d["metrics"][k]) for k in keys) + " |")
    if min(len(d["seeds"]) for d in diffs.values()) < 2:
        lines += ["", "Pairs sharing one seed have no interval: their cells are that seed's "
                  "difference, and nothing is resolved."]
    return lines


def study_markdown(study: Dict[str, Any]) -> List[str]:
    """The study section: ablation-shaped table, per-domain table, paired differences."""
    if not study.get("available"):
        return []
    return _arms_markdown(study) + _differences_markdown(study) + [""]


def signal_costs(runs: Sequence[Any], reference: str = "KD") -> Dict[str, Any]:
    """Per arm over seeds: training wall time without checkpoint writes, the time spent in DDK
    evaluations (ddk_eval) and teacher forwards, and the overhead against `reference`'s mean.
    `runs` are report.RunRecords named ARM@SEED."""
    per_arm: Dict[str, Dict[str, List[float]]] = {}
    for run in runs:
        arm, seed = split_column(run.name)
        end = run.end or {}
        timing = end.get("timing") or {}
        if seed is None or end.get("elapsed_s") is None:
            continue
        rows = per_arm.setdefault(arm, {"train_s": [], "ddk_eval_s": [], "teacher_s": []})
        rows["train_s"].append(float(end["elapsed_s"]) - float(timing.get("checkpoint", 0.0)))
        rows["ddk_eval_s"].append(float(timing.get("ddk_eval", 0.0)))
        rows["teacher_s"].append(float(timing.get("teacher_forward", 0.0)))
    out = {arm: {k: mean_interval(v) for k, v in rows.items()} for arm, rows in per_arm.items()}
    if reference in out:
        ref = out[reference]["train_s"]["mean"]
        for _arm, stats in out.items():
            stats["overhead_vs_" + reference] = (stats["train_s"]["mean"] - ref) / ref
    return out


def interval_weights(runs: Sequence[Any], arms: Sequence[str]) -> Dict[str, Any]:
    """Weights per interval of the given arms for the first seed they share."""
    by_arm: Dict[str, Dict[int, Any]] = {}
    for run in runs:
        arm, seed = split_column(run.name)
        if arm in arms and seed is not None:
            by_arm.setdefault(arm, {})[seed] = run
    present = [a for a in arms if a in by_arm]
    shared = sorted(set.intersection(*(set(by_arm[a]) for a in present))) if present else []
    if len(present) < 1 or not shared:
        return {"available": False}
    seed = shared[0]
    table = {a: [list(map(float, r["weights"])) for r in by_arm[a][seed].intervals]
             for a in present}
    return {"available": True, "seed": seed, "domains": by_arm[present[0]][seed].domains,
            "weights": table}


def costs_markdown(costs: Dict[str, Any], weights: Dict[str, Any]) -> List[str]:
    """Wall time per arm (and overhead vs KD), and interval weights of the DDK signals."""
    lines: List[str] = []
    if costs:
        lines += ["## Cost of each arm's signal", "",
                  "Training seconds per run (checkpoint writes excluded), mean ± 95% interval "
                  "over seeds; ddk_eval is the time spent measuring validation perplexities.", "",
                  "| arm | train s | ddk_eval s | teacher forward s | overhead vs KD |",
                  "|---|---|---|---|---|"]
        for arm, c in costs.items():
            over = c.get("overhead_vs_KD")
            lines.append(f"| {arm} | {_fmt(c['train_s'], 1)} | {_fmt(c['ddk_eval_s'], 1)} | "
                         f"{_fmt(c['teacher_s'], 1)} | "
                         f"{'n/a' if over is None else f'{100 * over:+.1f}%'} |")
        lines.append("")
    if weights.get("available"):
        arms = list(weights["weights"])
        lines += [f"## Domain weights per interval (seed {weights['seed']})", "",
                  "Weights applied in each interval, in domain order "
                  f"({', '.join(weights['domains'])}).", "",
                  "| interval | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        num = max(len(v) for v in weights["weights"].values())
        for i in range(num):
            cells = []
            for a in arms:
                w = weights["weights"][a]
                cells.append(" ".join(f"{x:.3f}" for x in w[i]) if i < len(w) else "")
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
