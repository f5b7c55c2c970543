"""megatron_ddk/cli.py and console.py: the subcommands' entry functions and the one mapping from
failures to exit codes (2 user error, 3 non-finite loss, 1 failed pipeline stage).

References: the exit codes the docs promise (README, docs/pipeline.md), the flags each parser
declares against the entry function's own signature, and the modules `megatron-ddk --help`
may load (no torch: the entry modules are imported only after parsing).
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import subprocess
import sys

import pytest

from megatron_ddk import cli, console
from megatron_ddk.config import ConfigError
from megatron_ddk.pipeline import runner
from megatron_ddk.pipeline.stage import StageFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "examples", "presets", "qwen1.5_14b_to_1.8b.yaml")


@pytest.fixture
def stderr_lines():
    """What console.messages() writes (its handler holds the stream it was created with)."""
    buf = io.StringIO()
    handler = console.messages().handlers[0]
    old = handler.setStream(buf)
    yield lambda: buf.getvalue().splitlines()
    handler.setStream(old)


def _subparsers():
    """{name: parser} of the megatron-ddk subcommands."""
    return cli.build_parser()._subparsers._group_actions[0].choices


def test_every_subcommand_names_an_entry_that_takes_exactly_its_flags():
    for name, sub in _subparsers().items():
        if name in cli.TOOLS:  # tools parse their own flags (tests/test_commands.py)
            continue
        entry = sub.get_default("entry")
        fn = cli.entry_function(entry)
        flags = {a.dest for a in sub._actions if a.dest != "help"}
        params = inspect.signature(fn).parameters
        assert flags == set(params), (name, entry, flags ^ set(params))


def test_the_one_exit_code_mapping(stderr_lines):
    from megatron_ddk.training.trainer import NonFiniteLossError

    def raising(err):
        def fn():
            raise err
        return fn

    assert console.run_command(lambda: None) == 0
    assert console.run_command(lambda code: code, 5) == 5
    assert console.run_command(raising(ValueError("bad flag"))) == 2
    assert console.run_command(raising(ConfigError("train.lr=-1: must be > 0"))) == 2
    assert console.run_command(raising(NonFiniteLossError("non-finite loss at step 3"))) == 3
    assert console.run_command(raising(StageFailed("stage arm failed (exit 2)"))) == 1
    assert stderr_lines() == ["error: bad flag", "error: train.lr=-1: must be > 0",
                              "error: non-finite loss at step 3",
                              "error: stage arm failed (exit 2)"]
    with pytest.raises(KeyError):  # a bug keeps its traceback
        console.run_command(raising(KeyError("x")))
    # tools/: the same codes, as SystemExit, and fn's value on success
    assert console.run_or_exit(lambda: "result") == "result"
    for err, code in ((ValueError("v"), 2), (NonFiniteLossError("n"), 3), (StageFailed("s"), 1)):
        with pytest.raises(SystemExit) as exit_info:
            console.run_or_exit(raising(err))
        assert exit_info.value.code == code


def test_pipeline_subcommand_maps_stage_failure_and_user_error(monkeypatch, stderr_lines):
    """cli.main -> runner.pipeline_main -> console.run_command, with the config loader and the
    run replaced (the real ones: tests/pipeline)."""
    seen = {}

    def load(config, overrides, smoke, corpus, out):
        seen.update(config=config, overrides=overrides, smoke=smoke, corpus=corpus, out=out)
        return "cfg"

    def fail(cfg):
        raise StageFailed(f"stage teacher failed (exit 2); log {cfg}.log")

    monkeypatch.setattr(runner, "load_pipeline_config", load)
    monkeypatch.setattr(runner, "run_pipeline", fail)
    argv = ["pipeline", "--config", "p.yaml", "--smoke", "--out", "o", "data.seed=3"]
    assert cli.main(argv) == 1
    assert seen == {"config": "p.yaml", "overrides": ["data.seed=3"], "smoke": True,
                    "corpus": None, "out": "o"}
    monkeypatch.setattr(runner, "run_pipeline", lambda cfg: "report.md")
    assert cli.main(argv) == 0
    monkeypatch.setattr(runner, "load_pipeline_config",
                        lambda *a, **k: (_ for _ in ()).throw(ConfigError("arms: empty")))
    assert cli.main(argv) == 2
    assert stderr_lines() == ["error: stage teacher failed (exit 2); log cfg.log",
                              "error: arms: empty"]


def test_check_config_through_main(stderr_lines):
    logging.getLogger("megatron").setLevel(logging.WARNING)
    assert cli.main(["check-config", "--static", "--config", PRESET]) == 0
    assert cli.main(["check-config", "--static", "--config", PRESET, "train.lr=-1"]) == 2
    assert cli.main(["check-config", "--config", PRESET]) == 2  # /path/to/ placeholders
    assert cli.main(["check-config", "--config", PRESET + ".missing"]) == 2
    lines = stderr_lines()
    assert lines[0] == f"{PRESET}: static checks passed"
    assert lines[1] == "error: invalid configuration:" and "train.lr=-1.0" in lines[2]
    assert lines[-1] == f"error: config file {PRESET}.missing does not exist"


def test_help_imports_no_torch_and_train_py_is_the_train_subcommand():
    code = ("import sys; from megatron_ddk import cli; cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'megatron.core', 'megatron_ddk.training', "
            "'megatron_ddk.pipeline') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "megatron_ddk.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: megatron-ddk train [-h] --config CONFIG [--load LOAD]")
