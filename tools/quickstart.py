"""The embedded default, end to end: `megatron-ddk pipeline --config examples/quickstart/pipeline.yaml`.

    python tools/quickstart.py            # the full demo (~15 min on 2 CPU cores)
    python tools/quickstart.py --smoke    # every stage on a tiny budget (~2 min), for tests
    python tools/quickstart.py --out DIR  # another output folder

A second run with nothing changed skips every stage (and says so); pass --fresh to start over
(the stage timings in the report are then those of this run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "examples", "quickstart", "pipeline.yaml")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny budget (~2 min), every stage")
    p.add_argument("--out", default=None, help="output folder (default runs/quickstart[_smoke])")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the pipeline")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(
        ROOT, "runs", "quickstart_smoke" if args.smoke else "quickstart"))
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    from megatron_ddk.cli import main as cli

    return cli(["pipeline", "--config", CONFIG, "--out", out] + (["--smoke"] if args.smoke else [])
               + args.overrides)


if __name__ == "__main__":
    sys.exit(main())
