"""The numbers of a distillation report: reading run folders and eval results, the per-domain
perplexity table, improvement / comparison / weight-direction facts, the steering-fidelity
table (valid vs test ratio before the first step: fidelity.py), and the Markdown page.

Inputs are the files the trainer and `megatron-ddk eval` write (docs/report.md lists them):
a run folder's metrics.jsonl (step / interval / end records) and run_config.yaml, and eval
result JSONs {"split", "seq_length", "fingerprint", "domains": {name: {"loss", "ppl", "tokens",
"samples", "fingerprint"}}, ...}. Evaluations are compared only when they were made on the same
samples: same split, seq_length, per-domain sample counts and sample fingerprints (else a
ValueError naming the eval file and the field that differs). Everything here reports what was
measured; nothing asserts an outcome. Bad input raises ValueError naming the file (and line)
and what to do.

Must not import torch, matplotlib or megatron_ddk.training (plots live in plots.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megatron_ddk.reporting.evals import (  # noqa: F401  (re-exported)
    COMPARED_FIELDS,
    EvalResult,
    _number,
    check_same_samples,
    load_eval,
)
from megatron_ddk.reporting.fidelity import fidelity_check, fidelity_markdown

logger = logging.getLogger(__name__)


@dataclass
class RunRecords:
    """What one training run folder recorded."""

    name: str
    """Label of the run in plots and tables (the NAME of NAME=DIR, else the folder's name)."""
    run_dir: str
    """The run folder (logging.run_dir)."""
    steps: List[Dict[str, Any]] = field(default_factory=list)
    """The {"kind": "step"} records, in file order."""
    intervals: List[Dict[str, Any]] = field(default_factory=list)
    """The {"kind": "interval"} records (one per DDK interval), in file order."""
    end: Optional[Dict[str, Any]] = None
    """The {"kind": "end"} record, None while the run is going (or if it died)."""
    config: Dict[str, Any] = field(default_factory=dict)
    """run_config.yaml as plain data ({} when absent)."""

    @property
    def domains(self) -> List[str]:
        """Domain names in manifest order (from the interval records)."""
        for rec in self.intervals:
            if rec.get("domains"):
                return [str(d) for d in rec["domains"]]
        num = len(self.intervals[0]["weights"]) if self.intervals else 0
        return [f"domain{i}" for i in range(num)]

    @property
    def policy(self) -> Optional[str]:
        """ddk.policy of the run (None when run_config.yaml is missing)."""
        return (self.config.get("ddk") or {}).get("policy")

    @property
    def last_step(self) -> int:
        """The last step the run reached (end record, else last step record)."""
        if self.end is not None:
            return int(self.end["step"])
        if self.steps:
            return int(self.steps[-1]["step"])
        return max([int(r["step"]) for r in self.intervals], default=0)

    def has_interval_ppl(self) -> bool:
        """Whether any interval recorded a student perplexity (adaptive policies do)."""
        return any(rec.get("ppl_student") is not None for rec in self.intervals)


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Every JSON object of a metrics.jsonl file.

    A last line without a newline that does not parse is a record still being written (or cut
    by a crash, which the trainer also drops on resume): it is skipped with a warning. Any other
    bad line raises ValueError naming the file and line.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass a run folder that a training run wrote "
                         f"(logging.run_dir, it holds metrics.jsonl)")
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for num, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if num == len(lines):  # no newline after it: a partial write
                logger.warning("%s:%d: skipping an unfinished last line", path, num)
                continue
            raise ValueError(f"{path}:{num}: not a valid JSON line ({err.msg} at column "
                             f"{err.colno}); fix or delete that line") from None
        if not isinstance(rec, dict) or "kind" not in rec:
            raise ValueError(f"{path}:{num}: expected a JSON object with a 'kind' field "
                             f"(step / interval / end), got {line[:80]!r}")
        out.append(rec)
    return out


def load_run(run_dir: str, name: Optional[str] = None) -> RunRecords:
    """Read a run folder's metrics.jsonl (and run_config.yaml when present)."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"run folder {run_dir} does not exist")
    path = os.path.join(run_dir, "metrics.jsonl")
    run = RunRecords(name=name or os.path.basename(os.path.normpath(run_dir)), run_dir=run_dir)
    for num, rec in enumerate(read_jsonl(path), start=1):
        kind = rec["kind"]
        if kind == "step":
            run.steps.append(rec)
        elif kind == "interval":
            if not isinstance(rec.get("weights"), list):
                raise ValueError(f"{path}: record {num} (kind interval) has no 'weights' list")
            # A run resumed at an interval boundary logs that interval again: keep the last.
            run.intervals = [r for r in run.intervals if r.get("interval") != rec.get("interval")
                             or rec.get("interval") is None] + [rec]
        elif kind == "end":
            run.end = rec
    cfg_path = os.path.join(run_dir, "run_config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            run.config = yaml.safe_load(f) or {}
    return run


def load_timing(path: str) -> Dict[str, float]:
    """A {stage name: seconds} JSON object (written by scripts/quickstart.sh)."""
    if not os.path.exists(path):
        raise ValueError(f"timing file {path} does not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{stage name: seconds}}")
    return {str(k): _number(v, f"{path}: {k}") for k, v in data.items()}


# ------------------------------------------------------------------------------ the numbers
def ppl_table(evals: Sequence[EvalResult]) -> Dict[str, Any]:
    """Per-domain perplexity of every eval, plus two summaries per column.

    mean_ppl: the token-weighted mean of the domain perplexities, sum(t_i ppl_i) / sum(t_i).
    pooled_ppl: the perplexity over all evaluated tokens, exp(sum(t_i loss_i) / sum(t_i)).
    """
    if not evals:
        raise ValueError("no eval results given; pass --eval NAME=result.json at least once")
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        raise ValueError(f"eval names {names} repeat; give each --eval a distinct NAME")
    domains = evals[0].domains
    for e in evals[1:]:
        if sorted(e.domains) != sorted(domains):
            raise ValueError(f"{e.path} has domains {e.domains} but {evals[0].path} has "
                             f"{domains}; evaluate every checkpoint on the same manifest")
    check_same_samples(evals)
    table: Dict[str, Any] = {"domains": list(domains), "columns": names, "ppl": {}, "loss": {},
                             "tokens": {}, "mean_ppl": {}, "pooled_ppl": {}}
    for e in evals:
        total = sum(e.tokens[d] for d in domains)
        if total <= 0:
            raise ValueError(f"{e.path}: the domains hold no evaluated tokens")
        table["ppl"][e.name] = {d: e.ppl[d] for d in domains}
        table["loss"][e.name] = {d: e.loss[d] for d in domains}
        table["tokens"][e.name] = {d: e.tokens[d] for d in domains}
        table["mean_ppl"][e.name] = sum(e.tokens[d] * e.ppl[d] for d in domains) / total
        table["pooled_ppl"][e.name] = math.exp(sum(e.tokens[d] * e.loss[d] for d in domains)
                                               / total)
    return table


def improvements(table: Dict[str, Any], baseline: str) -> Dict[str, Any]:
    """For every other column: relative ppl change per domain vs `baseline` (negative = better)."""
    if baseline not in table["columns"]:
        return {}
    base = table["ppl"][baseline]
    out = {}
    for col in table["columns"]:
        if col == baseline:
            continue
        rel = {d: (table["ppl"][col][d] - base[d]) / base[d] for d in table["domains"]}
        out[col] = {
            "rel_change": rel,
            "improved": {d: rel[d] < 0 for d in rel},
            "improved_all": all(r < 0 for r in rel.values()),
            "num_improved": sum(r < 0 for r in rel.values()),
            "mean_rel_change": (table["mean_ppl"][col] - table["mean_ppl"][baseline])
            / table["mean_ppl"][baseline],
        }
    return out


def compare(table: Dict[str, Any], first: str, second: str) -> Dict[str, Any]:
    """Per domain, `first` against `second`: rel_diff = (ppl_first - ppl_second) / ppl_second."""
    if first not in table["columns"] or second not in table["columns"]:
        return {}
    a, b = table["ppl"][first], table["ppl"][second]
    per = {}
    for d in table["domains"]:
        lower = first if a[d] < b[d] else second if b[d] < a[d] else "tie"
        per[d] = {first: a[d], second: b[d], "rel_diff": (a[d] - b[d]) / b[d], "lower": lower}
    return {
        "first": first, "second": second, "per_domain": per,
        "num_first_lower": sum(p["lower"] == first for p in per.values()),
        "mean_rel_diff": (table["mean_ppl"][first] - table["mean_ppl"][second])
        / table["mean_ppl"][second],
    }


def weight_direction(run: RunRecords) -> Dict[str, Any]:
    """Did DDK's weights move toward the domain with the highest ppl_S / ppl_T ratio at the
    first update (interval 0 -> 1)? Facts only, from the run's interval records.

    The ratio is the one measured at the end of interval 0 (recorded on interval 1, it drives
    that update). Reported: that domain, its weight before/after, whether it rose, the realised
    factor w1 / w0 of every domain and whether this domain's is the largest, and Eq. 2's factor
    psi / r = exp(ratio) of every domain.
    """
    recs = {int(r["interval"]): r for r in run.intervals if "interval" in r}
    if 0 not in recs or 1 not in recs:
        return {"available": False,
                "reason": f"{run.name} recorded {len(recs)} interval(s); two are needed"}
    ratio = recs[1].get("ratio")
    if ratio is None:
        return {"available": False,
                "reason": f"{run.name} (policy {run.policy}) recorded no ppl ratio at interval 1"}
    names = run.domains
    # Eq. 2 multiplies the prior r (interval 0: r_0 = Eq. 1), not the weights interval 0 was
    # sampled with (D_0 follows ddk.initial_sampling): compare against r where it is recorded.
    before_key = "r" if recs[0].get("r") is not None else "weights"
    w0, w1 = recs[0][before_key], recs[1]["weights"]
    top = max(range(len(ratio)), key=lambda i: ratio[i])
    factor = [b / a if a > 0 else None for a, b in zip(w0, w1)]  # None: JSON has no inf
    psi = [math.exp(min(r, 700.0)) for r in ratio]
    f_top = math.inf if factor[top] is None else factor[top]
    return {
        "available": True, "run": run.name, "step": int(recs[1]["step"]),
        "domains": names, "ratio": list(ratio), "weights_before": list(w0),
        "before": "r_0 (Eq. 1 prior)" if before_key == "r" else "interval 0 weights",
        "weights_after": list(w1), "factor": factor, "psi_over_r": psi,
        "max_ratio_domain": names[top],
        "weight_before": w0[top], "weight_after": w1[top], "delta": w1[top] - w0[top],
        "weight_rose": w1[top] > w0[top],
        "largest_factor": all(f is not None and f_top > f
                              for i, f in enumerate(factor) if i != top),
        "largest_psi_over_r": all(psi[top] > p for i, p in enumerate(psi) if i != top),
    }


def run_summary(run: RunRecords) -> Dict[str, Any]:
    """Policy, steps, end reason, elapsed and the trainer's stage split of one run."""
    end = run.end or {}
    timing = end.get("timing") or (run.steps[-1].get("timing") if run.steps else None) or {}
    return {"run_dir": run.run_dir, "policy": run.policy, "last_step": run.last_step,
            "num_intervals": len(run.intervals), "end_reason": end.get("reason"),
            "elapsed_s": end.get("elapsed_s"), "trainer_timing": timing,
            "final_lm_loss": run.steps[-1].get("lm_loss") if run.steps else None}


def timing_summary(timing: Dict[str, float]) -> Dict[str, Any]:
    """Stages and their total; an entry named total... is the measured total, not a stage."""
    stages = {k: v for k, v in timing.items() if not k.lower().startswith("total")}
    totals = [v for k, v in timing.items() if k.lower().startswith("total")]
    return {"stages": stages, "total_s": totals[-1] if totals else sum(stages.values()),
            "total_name": next((k for k in timing if k.lower().startswith("total")), "total")}


def steering_fidelity(evals: Sequence[EvalResult], ddk_run: Optional[RunRecords], ddk: str,
                      baseline: str = "student_before", teacher: str = "teacher"
                      ) -> Dict[str, Any]:
    """The DDK run's valid ratios before the first step against the test ratios of the same
    checkpoints (evals `baseline` and `teacher`): reporting/fidelity.py."""
    if ddk_run is None:
        return {"available": False, "reason": f"no --run named {ddk!r}"}
    by_name = {e.name: e for e in evals}
    return fidelity_check(ddk_run.intervals, ddk_run.name, by_name.get(baseline),
                          by_name.get(teacher), ddk_run.config)


def assemble(evals: Sequence[EvalResult], runs: Sequence[RunRecords],
             timing: Optional[Dict[str, float]], title: str, baseline: str = "student_before",
             ddk: str = "DDK", kd: str = "KD") -> Dict[str, Any]:
    """Every number of the report as one JSON-able dict (report.json); plots are added later."""
    table = ppl_table(evals)
    ddk_run = next((r for r in runs if r.name.lower() == ddk.lower()), None)
    col = {c.lower(): c for c in table["columns"]}
    first = evals[0]
    return {
        "title": title,
        "evaluation": {"split": first.split, "seq_length": first.seq_length,
                       "samples": dict(first.samples), "fingerprints": dict(first.fingerprints)},
        "inputs": {"eval": {e.name: e.path for e in evals},
                   "run": {r.name: r.run_dir for r in runs}},
        "table": table,
        "baseline": baseline,
        "improvement": improvements(table, baseline),
        "ddk_vs_kd": compare(table, col.get(ddk.lower(), ddk), col.get(kd.lower(), kd)),
        "weight_direction": (weight_direction(ddk_run) if ddk_run is not None else
                             {"available": False, "reason": f"no --run named {ddk!r}"}),
        "fidelity": steering_fidelity(evals, ddk_run, ddk),
        "timing": timing_summary(timing) if timing is not None else None,
        "runs": {r.name: run_summary(r) for r in runs},
        "plots": {},
    }


# ------------------------------------------------------------------------------ Markdown
def _ppl(v: float) -> str:
    return f"{v:.2f}" if v < 1000 else f"{v:.0f}"


def _pct(v: float) -> str:
    return f"{100 * v:+.1f}%"


def _secs(v: float) -> str:
    m, s = divmod(float(v), 60)
    return f"{int(m)}m{s:04.1f}s" if m else f"{s:.1f}s"


def _rows(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _md_table(rep: Dict[str, Any]) -> List[str]:
    t = rep["table"]
    rows = [[d] + [_ppl(t["ppl"][c][d]) for c in t["columns"]] for d in t["domains"]]
    rows.append(["**mean (token-weighted)**"] + [_ppl(t["mean_ppl"][c]) for c in t["columns"]])
    rows.append(["pooled ppl (all tokens)"] + [_ppl(t["pooled_ppl"][c]) for c in t["columns"]])
    ev = rep["evaluation"]
    role = ("held out: never read by training or DDK" if ev["split"] == "test" else
            "DDK's steering set: the DDK runs chose their weights on it")
    counts = sorted(set(ev["samples"].values()))
    out = [f"## Per-domain {ev['split']} perplexity (lower is better)", "",
           f"Every column is evaluated on the same **{ev['split']}** split ({role}): "
           f"{'/'.join(map(str, counts))} samples x {ev['seq_length']} tokens per domain, the "
           "same samples in every evaluation (checked by their fingerprints).", ""]
    out += _rows(["domain"] + t["columns"], rows)
    out += ["", "mean (token-weighted) = sum(tokens x ppl) / sum(tokens); pooled ppl = "
            "exp(sum(tokens x loss) / sum(tokens)).", ""]
    return out


def _md_improvement(rep: Dict[str, Any]) -> List[str]:
    imp, base, doms = rep["improvement"], rep["baseline"], rep["table"]["domains"]
    out = [f"## Change against {base} (relative perplexity change; negative = better)", ""]
    if not imp:
        return out + [f"No eval named {base!r} was given, so nothing is compared.", ""]
    rows = [[c, "yes" if v["improved_all"] else f"no ({v['num_improved']}/{len(doms)})"]
            + [_pct(v["rel_change"][d]) for d in doms] + [_pct(v["mean_rel_change"])]
            for c, v in imp.items()]
    return out + _rows(["eval", "better on every domain"] + doms + ["mean"], rows) + [""]


def _md_compare(rep: Dict[str, Any]) -> List[str]:
    cmp_ = rep["ddk_vs_kd"]
    if not cmp_:
        return []
    a, b = cmp_["first"], cmp_["second"]
    per = cmp_["per_domain"]
    out = [f"## {a} compared with {b} (as measured)", ""]
    out += _rows(["domain", b, a, f"{a} vs {b}", "lower"],
                 [[d, _ppl(p[b]), _ppl(p[a]), _pct(p["rel_diff"]), p["lower"]]
                  for d, p in per.items()])
    out += ["", f"{a} has the lower perplexity on {cmp_['num_first_lower']} of {len(per)} "
            f"domains; token-weighted mean {_pct(cmp_['mean_rel_diff'])} against {b}.", ""]
    return out


def _md_weights(rep: Dict[str, Any]) -> List[str]:
    wd = rep["weight_direction"]
    out = ["## Did the DDK weights move toward the domain the student lags most?", ""]
    if not wd.get("available"):
        return out + [f"Not available: {wd.get('reason')}.", ""]
    top = wd["max_ratio_domain"]
    out += [f"After the first interval (step {wd['step']}) the highest student/teacher "
            f"perplexity ratio was on **{top}**. Its weight went from {wd['weight_before']:.4f} "
            f"({wd.get('before', 'interval 0 weights')}) "
            f"to {wd['weight_after']:.4f} ({'rose' if wd['weight_rose'] else 'did not rise'}, "
            f"{wd['delta']:+.4f}); its factor w1/w0 was "
            f"{'the largest' if wd['largest_factor'] else 'not the largest'} of all domains, "
            f"and Eq. 2's factor psi/r = exp(ratio) was "
            f"{'the largest' if wd['largest_psi_over_r'] else 'not the largest'}.", ""]
    rows = [[d, f"{wd['ratio'][i]:.4f}", f"{wd['weights_before'][i]:.4f}",
             f"{wd['weights_after'][i]:.4f}",
             "inf" if wd["factor"][i] is None else f"{wd['factor'][i]:.4f}",
             f"{wd['psi_over_r'][i]:.4g}"] for i, d in enumerate(wd["domains"])]
    before = "r_0" if wd.get("before", "").startswith("r_0") else "weight interval 0"
    return out + _rows(["domain", "ratio ppl_S/ppl_T", before, "weight interval 1",
                        f"w1/{'r_0' if before == 'r_0' else 'w0'}", "exp(ratio)"], rows) + [""]


def _md_timing(rep: Dict[str, Any]) -> List[str]:
    out = []
    timing = rep["timing"]
    if timing:
        total = timing["total_s"] or 1.0
        rows = [[k, f"{v:.1f}", _secs(v), f"{100 * v / total:.1f}%"]
                for k, v in timing["stages"].items()]
        rows.append([f"**{timing['total_name']}**", f"{timing['total_s']:.1f}",
                     _secs(timing["total_s"]), "100%"])
        out += ["## Stage timing", ""] + _rows(["stage", "seconds", "time", "share"], rows) + [""]
    if rep["runs"]:
        rows = [[n, s["policy"] or "?", s["last_step"], s["num_intervals"], s["end_reason"] or "-",
                 "-" if s["elapsed_s"] is None else _secs(s["elapsed_s"]),
                 ", ".join(f"{k} {v:.1f}s" for k, v in s["trainer_timing"].items())]
                for n, s in rep["runs"].items()]
        out += ["## Training runs", ""]
        out += _rows(["run", "policy", "steps", "intervals", "end", "elapsed",
                      "trainer stages"], rows) + [""]
    return out


def render_markdown(rep: Dict[str, Any]) -> str:
    """The report page; plot paths in rep["plots"] are embedded as written (relative)."""
    plots = rep["plots"]

    def img(key: str, alt: str) -> List[str]:
        return [f"![{alt}]({plots[key]})", ""] if plots.get(key) else []

    lines = [f"# {rep['title']}", ""]
    lines += _md_table(rep) + img("domain_ppl", "per-domain perplexity of each eval")
    lines += _md_improvement(rep) + _md_compare(rep) + _md_weights(rep)
    lines += img("ddk_weights", "DDK domain weights per interval")
    lines += img("ddk_interval_ppl", "DDK per-domain perplexity and ratio at each interval")
    if "fidelity" in rep:
        lines += fidelity_markdown(rep["fidelity"])
    if plots.get("loss_overlay"):
        lines += ["## Training curves", ""] + img("loss_overlay", "training CE of every run")
    lines += _md_timing(rep)
    lines += ["Inputs: " + ", ".join(f"{k}={v}" for k, v in rep["inputs"]["eval"].items()), ""]
    return "\n".join(lines)
