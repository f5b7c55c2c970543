"""The embedded default, end to end:
`megatron-ddk pipeline --config examples/quickstart/pipeline.yaml`.

    megatron-ddk quickstart            # the full demo (~15 min on 2 CPU cores)
    megatron-ddk quickstart --smoke    # every stage on a tiny budget (~2 min), for tests
    megatron-ddk quickstart --out DIR  # another output folder

A second run with nothing changed skips every stage (and says so); pass --fresh to start over
(the stage timings in the report are then those of this run).
"""

from __future__ import annotations

import argparse
import os
import shutil

from megatron_ddk.commands.templates import template_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split("\n")))
    p.add_argument("--smoke", action="store_true", help="tiny budget (~2 min), every stage")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/quickstart[_smoke] in the current folder)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the pipeline")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(
        "runs", "quickstart_smoke" if args.smoke else "quickstart"))
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    from megatron_ddk.pipeline.runner import pipeline_main

    return pipeline_main(template_path("quickstart"), args.overrides, out=out, smoke=args.smoke)

