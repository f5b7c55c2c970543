"""The `megatron-ddk` command: train, eval, lm-eval, pipeline, check-config and the tools.

The tools (build-domains, preprocess, convert-hf, report, init, ...: TOOLS below) live in
megatron_ddk/commands/, one module each with its own parser and `main(argv) -> int`; main() hands
them the rest of the command line. tools/*.py in a checkout are thin wrappers of the same modules.
Exit codes are console.py's (0 ok, 1 failed stage, 2 user error, 3 non-finite loss).

Each of the other subcommands' parser names its entry function ("module:function"); main() parses
the flags, imports that one module, calls the function with the flags as keyword arguments (a
flag's dest is the parameter's name) and maps failures to exit codes in one place
(console.run_command: 2 user error, 3 non-finite loss, 1 failed pipeline stage). Nothing here
knows how training works.

The entry module is imported after parsing, not at the top: `megatron-ddk --help` takes 0.1-0.3 s,
importing the trainer (torch, Megatron-Core) 16 s (both measured on a loaded 2-core CPU box).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Dict, List, Optional, Tuple

from megatron_ddk.console import run_command

TOOLS: Dict[str, Tuple[str, str]] = {
    "init": ("init", "write a commented starting config (templates and presets)"),
    "build-domains": ("build_domains", "corpus -> train/valid/test datasets + manifest.yaml"),
    "preprocess": ("preprocess_data", "Megatron-LM's preprocess_data.py flags: JSONL -> .bin/.idx"),
    "train-tokenizer": ("train_tokenizer", "train a SentencePiece tokenizer on a corpus"),
    "demo-corpus": ("build_demo_corpus",
                    "build the embedded demo corpus from text on this machine"),
    "convert-hf": ("convert_hf_checkpoint",
                   "Hugging Face LLaMA/Qwen folder -> Megatron checkpoint"),
    "export-hf": ("export_hf", "Megatron checkpoint -> Hugging Face folder"),
    "cache-teacher": ("cache_teacher_logits", "write the offline teacher store of a run config"),
    "simulate-mixture": ("simulate_mixture", "replay DDK's mixture over a run's intervals"),
    "plan-memory": ("plan_memory", "memory per GPU of a TP x PP x DP layout"),
    "plan-teacher-store": ("plan_teacher_store", "disk space of an offline teacher store"),
    "report": ("make_report", "report.md and plots from evaluations and run folders"),
    "plot": ("plot_run", "plots of one or more run folders"),
    "lm-eval-tasks": ("build_lm_eval_tasks", "lm-eval task folder from a manifest's test split"),
    "quickstart": ("quickstart", "the quickstart pipeline on the embedded demo corpus"),
    "config-reference": ("config_reference", "every config field with its type, default, meaning"),
}
"""Tool subcommands: name -> (module in megatron_ddk.commands, one-line help)."""


def _subcommand(sub, name: str, entry: str, help: str, config: Optional[str] = "run YAML",
                overrides: str = "section.field=value overrides") -> argparse.ArgumentParser:
    """A subcommand parser calling `entry`; with `config` (its --config help) it also takes
    --config and the positional key=value overrides."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(entry=entry)
    if config:
        p.add_argument("--config", required=True, help=config)
        p.add_argument("overrides", nargs="*", help=overrides)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ddk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _subcommand(sub, "train", "megatron_ddk.training.entry:train_main",
                    "train (CPT, KD, DDK or an ablation, by config)")
    p.add_argument("--load", default=None, help="resume from this checkpoint folder")

    p = _subcommand(sub, "eval", "megatron_ddk.training.entry:eval_main",
                    "per-domain held-out loss and perplexity of a checkpoint",
                    config="run YAML (model, parallel, data sections)")
    p.add_argument("--load", required=True, help="checkpoint folder (student or teacher; its "
                   "recorded model is built when the config's model differs)")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--split", choices=["valid", "test"], default="test",
                   help="held-out split: test (reports, default) or valid (DDK's steering set)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per domain (default: all test samples; "
                   "ddk.valid_samples_per_domain for valid)")

    p = _subcommand(sub, "lm-eval", "megatron_ddk.evaluation.lm_eval:lm_eval_main",
                    "lm-evaluation-harness on a checkpoint (exported to a temporary Hugging Face "
                    "folder; docs/lm_eval.md)", config=None)
    p.add_argument("--load", required=True, help="checkpoint root or iter_NNNNNNN folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--limit", type=float, default=None, help="items per task (lm-eval's limit)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--manifest", default=None, help="build the local tasks (ddk_ppl, ddk_mc) "
                   "from this manifest's test split")
    p.add_argument("--include-path", action="append", default=[],
                   help="extra lm-eval task folder (`megatron-ddk lm-eval-tasks`); repeatable")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="let code tasks (humaneval, mbpp) run generated code")

    p = _subcommand(sub, "pipeline", "megatron_ddk.pipeline.runner:pipeline_main",
                    "the whole job from one config: data -> teacher -> arms x seeds -> test "
                    "evaluation -> report -> export (resumable)",
                    config="pipeline YAML (docs/pipeline.md)",
                    overrides="section.key=value overrides of the pipeline")
    p.add_argument("--corpus", default=None, help="a per-domain corpus folder, or a file / "
                   "folder / glob of a mixed corpus (data.domain_field or data.cluster)")
    p.add_argument("--out", default=None, help="output folder (default: the config's out)")
    p.add_argument("--smoke", action="store_true", help="apply the config's smoke section")

    p = _subcommand(sub, "check-config", "megatron_ddk.training.check_command:check_config_main",
                    "run the static (and optionally host) checks")
    p.add_argument("--world-size", type=int, default=None, help="check batch sizes for this world")
    p.add_argument("--host", action="store_true", help="also run this host's checks")
    p.add_argument("--deep", action="store_true", help="also check the manifest and the "
                   "checkpoints the config names (vocabulary, tokenizer, shapes, save folder)")
    p.add_argument("--static", action="store_true", help="only the checks that need no files "
                   "(schema, cross-field rules, batch sizes): a preset off the cluster; without "
                   "it, exactly what train checks before it builds anything")
    for name, (_module, text) in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed here, parsed by the tool
    return parser


def run_tool(name: str, argv: List[str]) -> int:
    """Run tool `name` with its own flags; its parser names itself `megatron-ddk NAME`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    module = importlib.import_module(f"megatron_ddk.commands.{TOOLS[name][0]}")
    prog, sys.argv[0] = sys.argv[0], f"megatron-ddk {name}"
    try:
        return run_command(module.main, argv)
    finally:
        sys.argv[0] = prog


def entry_function(entry: str):
    """The function a subcommand's "module:function" names (its module imported now)."""
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, call the subcommand's entry function with the flags, return its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return run_tool(argv[0], argv[1:])
    flags = vars(build_parser().parse_args(argv))
    del flags["command"]
    return run_command(entry_function(flags.pop("entry")), **flags)


if __name__ == "__main__":
    sys.exit(main())
