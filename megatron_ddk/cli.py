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
    from megatron_ddk.models.teacher_config import resolve_teacher

    try:
        cfg = load_config(args.config, args.overrides)
        if args.deep:  # reads the manifest and checkpoint metadata; reports every problem
            from megatron_ddk.training.deep_check import deep_errors

            logging.getLogger("megatron").setLevel(logging.WARNING)  # .idx reader chatter

            errs = deep_errors(cfg, args.world_size)
            if errs:
                raise ConfigError(f"{len(errs)} problem(s):\n  - " + "\n  - ".join(errs))
        cfg = static_checks(resolve_teacher(cfg), args.world_size)
    except ConfigError as exc:
        messages().error(f"error: {exc}")
        return 2
    messages().info(f"{args.config}: static {'and deep ' if args.deep else ''}checks passed")
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

    return eval_main(args.config, args.overrides, load=args.load, output=args.output,
                     split=args.split, samples=args.samples)


def _lm_eval(args) -> int:
    from megatron_ddk.evaluation.lm_eval import lm_eval_main

    return lm_eval_main(args.load, args.tasks, args.output, args.limit, args.batch_size,
                        args.manifest, args.include_path, args.device,
                        args.allow_code_execution)


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

    p = sub.add_parser("eval", help="per-domain held-out loss and perplexity of a checkpoint")
    p.add_argument("--config", required=True, help="run YAML (model, parallel, data sections)")
    p.add_argument("--load", required=True, help="checkpoint folder (student or teacher; its "
                   "recorded model is built when the config's model differs)")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--split", choices=["valid", "test"], default="test",
                   help="held-out split: test (reports, default) or valid (DDK's steering set)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per domain (default: all test samples; "
                   "ddk.valid_samples_per_domain for valid)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(func=_eval)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness on a checkpoint (exported to a "
                       "temporary Hugging Face folder; docs/lm_eval.md)")
    p.add_argument("--load", required=True, help="checkpoint root or iter_NNNNNNN folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--limit", type=float, default=None, help="items per task (lm-eval's limit)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--manifest", default=None, help="build the local tasks (ddk_ppl, ddk_mc) "
                   "from this manifest's test split")
    p.add_argument("--include-path", action="append", default=[],
                   help="extra lm-eval task folder (tools/build_lm_eval_tasks.py); repeatable")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="let code tasks (humaneval, mbpp) run generated code")
    p.set_defaults(func=_lm_eval)

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
    p.add_argument("--deep", action="store_true", help="also check the manifest and the "
                   "checkpoints the config names (vocabulary, tokenizer, shapes, save folder)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(func=_check_config)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
