"""The package as a user installs it: a wheel built from the repository, installed (not
editable) into a fresh virtual environment, then from an empty folder `megatron-ddk init my_run`
and `megatron-ddk pipeline --config my_run/pipeline.yaml --corpus C --smoke` to its report.

The fresh environment gets its dependencies (torch, Megatron-Core, ...) from the test
environment's site-packages through a folder of links that leaves out megatron_ddk itself, so
pip (linked too) resolves them as installed and installs only the wheel (with --no-index: nothing
downloaded).
No checkout is on sys.path: the commands run from an empty folder without PYTHONPATH, and the
test checks that megatron_ddk is imported from the fresh environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.pipeline.corpus import build_corpus

pytestmark = pytest.mark.slow  # whole pipeline runs (minutes on 2 CPU cores)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(argv, cwd, env=None, timeout=900):
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout[-3000:]}" \
                                f"\n{res.stderr[-5000:]}"
    return res


def _source_copy(dest: str) -> str:
    """The repository's files as git knows them (tracked, and new files not ignored)."""
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout
    for rel in files.splitlines():
        src = os.path.join(ROOT, rel)
        if os.path.islink(src) or not os.path.isfile(src):
            continue  # examples/ (a link into the package) and deleted files
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    return dest


def _dependency_links(dest: str) -> str:
    """A folder linking every entry of this environment's site-packages but megatron_ddk's."""
    site = sysconfig.get_paths()["purelib"]
    os.makedirs(dest)
    for name in os.listdir(site):
        if name.startswith(("megatron_ddk", "__editable__", "megatron-ddk")) or \
                name.endswith(".pth"):
            continue
        os.symlink(os.path.join(site, name), os.path.join(dest, name))
    return dest


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """(python, bin folder) of a fresh venv with the repository's wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    src = _source_copy(str(root / "src"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(root / "dist"), src], str(root))
    wheels = [f for f in os.listdir(root / "dist") if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    # without its own pip and setuptools: the linked ones (pip, setuptools >= torch's floor) serve
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], str(root))
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   str(root)).stdout.strip()
    with open(os.path.join(purelib, "_megatron_ddk_test_deps.pth"), "w") as f:
        f.write(_dependency_links(str(root / "deps")) + "\n")
    _run([python, "-m", "pip", "install", "--no-index", "-q", "--disable-pip-version-check",
          str(root / "dist" / wheels[0])], str(root))
    return python, str(venv / "bin")


def test_wheel_init_and_pipeline_from_an_empty_folder(fresh_env, tmp_path):
    python, bin_dir = fresh_env
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1")
    where = _run([python, "-c", "import megatron_ddk; print(megatron_ddk.__file__)"],
                 str(work), env).stdout.strip()
    assert where.startswith(os.path.dirname(bin_dir)) and not where.startswith(ROOT), where

    corpus = build_corpus(str(tmp_path / "corpus"), max_bytes=60_000)
    _run([os.path.join(bin_dir, "megatron-ddk"), "init", "my_run"], str(work), env)
    assert os.path.isfile(work / "my_run" / "pipeline.yaml")
    res = _run([os.path.join(bin_dir, "megatron-ddk"), "pipeline", "--config",
                "my_run/pipeline.yaml", "--corpus", corpus, "--smoke"], str(work), env)
    report = work / "my_run" / "runs" / "report.md"
    assert report.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    text = report.read_text()
    assert "DDK" in text and "KD" in text
