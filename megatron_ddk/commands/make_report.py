"""Write the distillation report: per-domain perplexity table, improvement / comparison facts,
DDK weight direction, stage timing and embedded plots (report.md + report.json).

    megatron-ddk report --out runs/quickstart/report.md --title "megatron-ddk quickstart" \\
        --eval teacher=runs/quickstart/eval/teacher.json \\
        --eval student_before=runs/quickstart/eval/student.json \\
        --eval CPT=runs/quickstart/eval/cpt.json --eval KD=runs/quickstart/eval/kd.json \\
        --eval DDK=runs/quickstart/eval/ddk.json \\
        --run CPT=runs/quickstart/cpt --run KD=runs/quickstart/kd --run DDK=runs/quickstart/ddk \\
        --timing runs/quickstart/timing.json

--eval NAME=FILE (repeated, columns in the order given) are `megatron-ddk eval` outputs;
--run NAME=DIR (repeated) are run folders for the weight plot and training curves; the run and
eval named by --ddk-name / --kd-name (default DDK / KD) are compared, and every eval against
--baseline (default student_before). --timing is a JSON object {stage: seconds}. Plots go to
plots/ next to the report and are linked with relative paths; report.json (same folder, same
stem) holds every number. Exits 2 with a message naming the file on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_ddk.console import results
from megatron_ddk.reporting import (
    assemble,
    load_eval,
    load_run,
    load_timing,
    plots,
    render_markdown,
)


def named(arg: str) -> Tuple[str, str]:
    if "=" not in arg or not arg.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"{arg!r}: expected NAME=PATH")
    name, path = arg.split("=", 1)
    return name, path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="report.md to write (report.json beside it)")
    p.add_argument("--eval", type=named, action="append", default=[], metavar="NAME=FILE",
                   help="an eval result JSON; repeat, columns in this order")
    p.add_argument("--run", type=named, action="append", default=[], metavar="NAME=DIR",
                   help="a training run folder; repeat")
    p.add_argument("--lm-eval", type=named, action="append", default=[], metavar="NAME=FILE",
                   help="a `megatron-ddk lm-eval` result (NAME: ARM@SEED or ARM); repeat")
    p.add_argument("--timing", help="JSON object {stage name: seconds}")
    p.add_argument("--title", default="megatron-ddk report")
    p.add_argument("--baseline", default="student_before", help="eval every other is compared to")
    p.add_argument("--ddk-name", default="DDK", help="the DDK eval/run name")
    p.add_argument("--kd-name", default="KD", help="the KD eval name DDK is compared with")
    return p.parse_args(argv)


def draw(rep: Dict[str, Any], runs, ddk_name: str, out_dir: str) -> Dict[str, str]:
    """All plots into out_dir/plots; returns {key: path relative to out_dir}."""
    plot_dir = os.path.join(out_dir, "plots")
    made: Dict[str, Optional[str]] = {
        "domain_ppl": plots.plot_ppl_bars(rep["table"], os.path.join(plot_dir, "domain_ppl.png")),
        "loss_overlay": plots.plot_loss_overlay(runs, os.path.join(plot_dir, "loss_overlay.png")),
    }
    for run in runs:
        files = plots.plot_run(run, plot_dir, prefix=f"{run.name}_")
        for path in files:
            kind = os.path.basename(path)[len(run.name) + 1:-len(".png")]
            key = f"ddk_{kind}" if run.name.lower() == ddk_name.lower() else f"{run.name}_{kind}"
            made[key] = path
    return {k: os.path.relpath(v, out_dir) for k, v in made.items() if v}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    evals = [load_eval(path, name) for name, path in args.eval]  # ValueError: exit 2
    runs = [load_run(path, name) for name, path in args.run]
    timing = load_timing(args.timing) if args.timing else None
    rep = assemble(evals, runs, timing, args.title, baseline=args.baseline,
                   ddk=args.ddk_name, kd=args.kd_name)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    rep["plots"] = draw(rep, runs, args.ddk_name, out_dir)
    from megatron_ddk.reporting.study_report import study_section

    study, study_lines = study_section(rep["table"], runs, out_dir)
    rep["plots"].update(study.pop("plots", {}))
    rep.update(study)
    if args.lm_eval:
        from megatron_ddk.evaluation.downstream_report import downstream_table, load_results
        from megatron_ddk.evaluation.downstream_report import render_markdown as downstream_md

        rep["downstream"] = downstream_table(load_results(dict(args.lm_eval)))
        study_lines += ["## Downstream (lm-evaluation-harness)", "", downstream_md(
            rep["downstream"]), ""]
    with open(args.out, "w") as f:
        f.write(render_markdown(rep) + "\n".join(study_lines))
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(rep, f, indent=1)
    written: List[str] = [args.out, json_path] + [os.path.join(out_dir, p)
                                                  for p in rep["plots"].values()]
    for path in written:
        results().info(path)
    return 0

