"""The `megatron-ddk` command: train, eval and check-config subcommands.

Each subcommand parses its own flags and hands over to one function; nothing here knows how
training works.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _check_config(args) -> int:
    from megatron_ddk.config import ConfigError, load_config, static_checks
    from megatron_ddk.config.host import host_errors

    from megatron_ddk.console import messages

    try:
        cfg = static_checks(load_config(args.config, args.overrides), args.world_size)
    except ConfigError as exc:
        messages().error(f"error: {exc}")
        return 2
    messages().info(f"{args.config}: static checks passed")
    if args.host:
        errs = host_errors(cfg)
        for e in errs:
            messages().error(f"host: {e}")
        return 2 if errs else 0
    return 0


def _train(args) -> int:
    from megatron_ddk.training.entry import train_main

    return train_main(args.config, args.overrides, load=args.load)


def _eval(args) -> int:
    from megatron_ddk.training.entry import eval_main

    return eval_main(args.config, args.overrides, load=args.load, output=args.output)


def _pipeline(args) -> int:
    from megatron_ddk.pipeline.runner import pipeline_main

    return pipeline_main(args.config, args.overrides, corpus=args.corpus, out=args.out,
                         smoke=args.smoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ddk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (CPT, KD, DDK or an ablation, by config)")
    p.add_argument("--config", required=True, help="run YAML")
    p.add_argument("--load", default=None, help="resume from this checkpoint folder")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="per-domain validation loss and perplexity of a checkpoint")
    p.add_argument("--config", required=True, help="run YAML (model, parallel, data sections)")
    p.add_argument("--load", required=True, help="checkpoint folder (student or teacher)")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(func=_eval)

    p = sub.add_parser("pipeline", help="the whole job from one config: data -> teacher -> "
                       "arms x seeds -> test evaluation -> report -> export (resumable)")
    p.add_argument("--config", required=True, help="pipeline YAML (docs/pipeline.md)")
    p.add_argument("--corpus", default=None, help="folder of per-domain .jsonl/.txt files")
    p.add_argument("--out", default=None, help="output folder (default: the config's out)")
    p.add_argument("--smoke", action="store_true", help="apply the config's smoke section")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the pipeline")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("check-config", help="run the static (and optionally host) checks")
    p.add_argument("--config", required=True, help="run YAML")
    p.add_argument("--world-size", type=int, default=None, help="check batch sizes for this world")
    p.add_argument("--host", action="store_true", help="also run this host's checks")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(func=_check_config)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
