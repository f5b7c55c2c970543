"""Write a commented starting config from the package's templates or presets.

    megatron-ddk init my_run                         # my_run/pipeline.yaml for your own corpus
    megatron-ddk init my_run --template quickstart   # the quickstart (also study, mixed_file, ...)
    megatron-ddk init my_run --preset qwen1.5_7b_to_1.8b   # a paper-scale run.yaml (+ manifest)
    megatron-ddk init --list                         # what there is

then, for a template:  megatron-ddk pipeline --config my_run/pipeline.yaml --corpus CORPUS
An existing file is never overwritten (pass --force to replace it).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from megatron_ddk.atomic import write_atomic
from megatron_ddk.commands.templates import (
    preset_files,
    preset_names,
    template_files,
    template_names,
)
from megatron_ddk.console import results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", help="folder to write into (created)")
    p.add_argument("--template", default="my_data",
                   help="pipeline template (default my_data; --list shows all)")
    p.add_argument("--preset", default=None, help="a run preset instead of a template")
    p.add_argument("--force", action="store_true", help="replace files that exist")
    p.add_argument("--list", action="store_true", help="list templates and presets")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        results().info("templates (pipeline.yaml): " + ", ".join(template_names()))
        results().info("presets (run.yaml):        " + ", ".join(preset_names()))
        return 0
    if not args.dir:
        raise ValueError("init: name the folder to write into, e.g. `megatron-ddk init my_run`")
    files = (preset_files(args.preset, args.dir) if args.preset
             else template_files(args.template, args.dir))
    existing = [f for f in files if os.path.exists(f)]
    if existing and not args.force:
        raise ValueError(f"{existing[0]} exists; nothing was written (pass --force to replace "
                         "it, or choose another folder)")
    os.makedirs(args.dir, exist_ok=True)
    for path, text in files.items():
        write_atomic(path, text)
        results().info(f"wrote {path}")
    first = os.path.join(args.dir, "run.yaml" if args.preset else "pipeline.yaml")
    if args.preset:
        results().info(f"next: edit the /path/to/ placeholders, then `megatron-ddk check-config "
                       f"--config {first}` and `megatron-ddk plan-memory --config {first}`")
    else:
        results().info(f"next: megatron-ddk pipeline --config {first} --corpus CORPUS [--smoke]")
    return 0
