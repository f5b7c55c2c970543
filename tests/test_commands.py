"""Every `megatron-ddk` subcommand and every tools/*.py wrapper as a user runs them: --help
answers, and a user error ends with exit code 2 and one `error:` line naming the input
(console.py's rules). One table; each row is a real process (forked from the warm fork server,
so a row costs a fraction of a second instead of an interpreter start)."""

from __future__ import annotations

import os
import sys

import pytest

from megatron_ddk import cli
from megatron_ddk.testing.commands import run_command

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MISSING = "/nonexistent/ddk-input"
"""An input that does not exist: every error line must name it."""

USER_ERRORS = {
    "train": ["--config", f"{MISSING}.yaml"],
    "eval": ["--config", f"{MISSING}.yaml", "--load", MISSING],
    "lm-eval": ["--load", MISSING, "--tasks", "arc_easy"],
    "pipeline": ["--config", f"{MISSING}.yaml"],
    "check-config": ["--config", f"{MISSING}.yaml"],
    "init": ["DIR", "--template", "ddk-input-template"],
    "build-domains": ["--input", MISSING, "--output-dir", "OUT", "--tokenizer-model",
                      f"{MISSING}.model"],
    "preprocess": ["--input", f"{MISSING}.jsonl", "--output-prefix", "OUT/x",
                   "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                   f"{MISSING}.model"],
    "train-tokenizer": ["--input", MISSING, "--output-prefix", "OUT/tok"],
    "demo-corpus": ["--output-dir", "OUT/c", "--domains", "ddk-input-domain"],
    "convert-hf": ["--hf-dir", MISSING, "--save", "OUT/ckpt"],
    "export-hf": ["--load", MISSING, "--out", "OUT/hf"],
    "cache-teacher": ["--config", f"{MISSING}.yaml", "--out", "OUT/store"],
    "simulate-mixture": ["--manifest", f"{MISSING}.yaml", "--synthetic", "--steps", "10"],
    "plan-memory": ["--config", f"{MISSING}.yaml"],
    "plan-teacher-store": ["--ks", "ddk-input-k"],
    "report": ["--out", "OUT/report.md", "--eval", f"x={MISSING}.json"],
    "plot": [MISSING],
    "lm-eval-tasks": ["--manifest", f"{MISSING}.yaml", "--out", "OUT/tasks"],
    "quickstart": ["--out", "OUT/q", "ddk-input-section.field=1"],
    "config-reference": None,  # no input to get wrong (--check of a stale page: exit 1)
}
"""One user error per subcommand (None: it takes no input); the error line must contain
"ddk-input"."""

WRAPPERS = {f[:-3]: f for f in sorted(os.listdir(os.path.join(ROOT, "tools")))
            if f.endswith(".py")}


class _Result:
    """Exit code and output (stdout and stderr interleaved) of one command."""

    def __init__(self, code: int, output: str):
        self.returncode, self.stdout, self.stderr = code, output, output


def _run(argv, cwd):
    """`python ARGV` as a real process, forked from the warm fork server (testing/commands.py:
    the same program, arguments, environment, output and exit code as a new interpreter)."""
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    return _Result(*run_command([sys.executable] + argv, env, str(cwd), 180))


def _subcommands():
    return [a for a in cli.build_parser()._subparsers._group_actions[0].choices]


def test_the_table_covers_every_subcommand_and_every_wrapper():
    assert set(USER_ERRORS) == set(_subcommands())
    modules = {module for module, _ in cli.TOOLS.values()}
    assert {name for name in WRAPPERS if name != "check_wheels"} == modules - {"init"}


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_subcommand_help_and_user_error(name, tmp_path):
    res = _run(["-m", "megatron_ddk.cli", name, "--help"], tmp_path)
    assert res.returncode == 0 and "usage:" in res.stdout, (name, res.stderr[-2000:])
    if USER_ERRORS[name] is None:
        return
    args = [a.replace("OUT", str(tmp_path / "out")) for a in USER_ERRORS[name]]
    res = _run(["-m", "megatron_ddk.cli", name] + args, tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2, (name, res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and "ddk-input" in lines[0], (name, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, (name, res.stderr[-3000:])


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_tools_wrapper_help(wrapper, tmp_path):
    res = _run([os.path.join(ROOT, "tools", WRAPPERS[wrapper]), "--help"], tmp_path)
    assert res.returncode == 0 and "usage:" in res.stdout, (wrapper, res.stderr[-2000:])


SUBCOMMAND_OF = {module: name for name, (module, _) in cli.TOOLS.items()}
"""tools/ wrapper module -> the subcommand it runs."""


@pytest.mark.parametrize("wrapper", sorted(w for w in WRAPPERS if w in SUBCOMMAND_OF))
def test_tools_wrapper_user_error_exits_2_with_one_line(wrapper, tmp_path):
    args = USER_ERRORS[SUBCOMMAND_OF[wrapper]]
    if args is None:
        return
    res = _run([os.path.join(ROOT, "tools", WRAPPERS[wrapper])]
               + [a.replace("OUT", str(tmp_path / "out")) for a in args], tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2, (wrapper, res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and "ddk-input" in lines[0], (wrapper, res.stderr[-3000:])
