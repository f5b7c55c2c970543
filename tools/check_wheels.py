"""Prepare, and check, the folder of wheels that installs megatron-ddk on a GPU host without network.

On a networked machine (Linux, macOS or Windows, any Python >= 3.8 with pip):

    python3 tools/check_wheels.py download wheels/       # CPython 3.12, manylinux x86_64

then copy wheels/ to the GPU host (inside the repository is fine: wheels/ or shared/wheels/), where
scripts/gpu_check.sh installs from it. Anywhere, before that:

    python3 tools/check_wheels.py check wheels/          # exit 0: complete; 1: what is missing

What the folder holds: every requirement of setup.py (install_requires and the `gpu` extra) with
all their dependencies, as wheels for the target Python and platform, plus setuptools and wheel
(the project itself installs with --no-build-isolation). Not torch: the GPU host image brings its
CUDA build of torch (2.11 .. 2.13) and pip must keep it; megatron-core is therefore downloaded
without its dependencies and its own non-torch requirements (numpy, packaging) are added.

`check` runs pip's own resolver offline, once per torch minor version (2.11, 2.12, 2.13 by
default): `pip download --no-index --find-links FOLDER --dest TMP --python-version 3.12
--platform ... --only-binary=:all:` (download, not install --dry-run: only download checks
Requires-Python against the target Python rather than the running one), with a stand-in torch
wheel (metadata only, written to a temporary folder) that plays the preinstalled torch. A requirement pip cannot
resolve from the folder for that Python and platform is named, with pip's own line.

Standard library and pip only (it runs before anything is installed); imports nothing from
megatron_ddk.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PYTHON = "3.12"
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                     "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
DEFAULT_TORCH = ("2.11.0", "2.12.0", "2.13.0")
PROVIDED = ("torch",)
"""Requirements the GPU host's image provides; never downloaded."""
BUILD_TOOLS = ("setuptools>=69", "wheel")
NO_DEPS = ("megatron-core",)
"""Downloaded without dependencies (their dependency tree holds torch)."""


def _name(requirement: str) -> str:
    """The normalised project name of a requirement string ("Megatron_Core>=0.16" -> megatron-core)."""
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "-_."):
            requirement = requirement[:i]
            break
    return requirement.strip().lower().replace("_", "-").replace(".", "-")


def setup_requirements(setup_py: str, extras: Sequence[str]) -> List[str]:
    """install_requires + the given extras of setup.py, read without running it."""
    with open(setup_py, encoding="utf-8") as f:
        tree = ast.parse(f.read(), setup_py)
    values: Dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS"):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    if "INSTALL_REQUIRES" not in values or "EXTRAS" not in values:
        raise SystemExit(f"{setup_py}: expected module-level INSTALL_REQUIRES and EXTRAS lists")
    reqs = list(values["INSTALL_REQUIRES"])
    for extra in extras:
        if extra not in values["EXTRAS"]:
            raise SystemExit(f"{setup_py}: no extra {extra!r} (has {sorted(values['EXTRAS'])})")
        reqs += [r for r in values["EXTRAS"][extra] if r not in reqs]
    return reqs


def target_args(python_version: str, platforms: Sequence[str]) -> List[str]:
    """pip arguments that select wheels for another interpreter and platform."""
    abi = "cp" + python_version.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for p in platforms:
        args += ["--platform", p]
    return args


def stand_in_wheel(folder: str, name: str, version: str) -> str:
    """A metadata-only wheel `name==version` (py3-none-any) in `folder`; returns its path."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = os.path.join(folder, f"{dist}-py3-none-any.whl")
    info = f"{dist}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 f"Summary: stand-in for the GPU host's preinstalled {name}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: check_wheels\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def _pip(args: List[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([sys.executable, "-m", "pip"] + args, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _pip_problem(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    picked = [ln for ln in lines if ln.startswith("ERROR") or "No matching distribution" in ln
              or "conflict" in ln.lower() or "Could not find a version" in ln]
    return " | ".join(picked[:4] or lines[-3:])


def check(folder: str, requirements: Sequence[str], python_version: str,
          platforms: Sequence[str], torch_versions: Sequence[str],
          timeout: int = 300) -> dict:
    """{"ok": bool, "problems": [...], "resolved": {torch version: [name==version, ...]}}."""
    problems: List[str] = []
    resolved: Dict[str, List[str]] = {}
    if not os.path.isdir(folder):
        return {"ok": False, "problems": [f"{folder}: no such folder"], "resolved": {}}
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    if not wheels:
        return {"ok": False, "problems": [f"{folder}: holds no .whl files"], "resolved": {}}
    for extra in BUILD_TOOLS:
        if not any(_name(w.split("-")[0]) == _name(extra) for w in wheels):
            problems.append(f"{folder}: no {_name(extra)} wheel (the project installs with "
                            f"--no-build-isolation; add it with `pip download {extra}`)")
    for w in wheels:
        if _name(w.split("-")[0]) in PROVIDED:
            problems.append(f"{folder}/{w}: remove it: {_name(w.split('-')[0])} comes with the "
                            f"GPU host's image and must not be replaced")
    for version in torch_versions:
        with tempfile.TemporaryDirectory() as tmp:
            stand_in_wheel(tmp, "torch", version)
            dest = os.path.join(tmp, "resolved")
            args = (["download", "--no-index", "--find-links", folder, "--find-links", tmp,
                     "--dest", dest, "--quiet"] + target_args(python_version, platforms)
                    + [f"torch=={version}"] + list(requirements))
            proc = _pip(args, timeout)
            if proc.returncode != 0:
                problems.append(f"torch {version}, Python {python_version}: pip cannot resolve "
                                f"from {folder}: {_pip_problem(proc.stderr)}")
                continue
            resolved[version] = sorted("==".join(f.split("-")[:2]) for f in os.listdir(dest)
                                       if f.endswith(".whl") and _name(f) not in PROVIDED)
    return {"ok": not problems, "problems": problems, "resolved": resolved}


def _requires_dist(wheel_path: str) -> List[str]:
    """The unconditional (no extra) Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel_path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8")
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            out.append(line.split(":", 1)[1].strip())
    return out


def download(folder: str, requirements: Sequence[str], python_version: str,
             platforms: Sequence[str], timeout: int = 1800) -> None:
    """Fill `folder` (needs network): see the module docstring."""
    os.makedirs(folder, exist_ok=True)
    target = target_args(python_version, platforms)
    no_deps = [r for r in requirements if _name(r) in NO_DEPS]
    rest = [r for r in requirements if _name(r) not in NO_DEPS + PROVIDED]
    if no_deps:
        _run_or_exit(["download", "--dest", folder, "--no-deps"] + target + no_deps, timeout)
        for r in no_deps:  # their own non-torch requirements, with dependencies
            wheel = _find_wheel(folder, _name(r))
            rest += [d for d in _requires_dist(wheel) if _name(d) not in PROVIDED]
    _run_or_exit(["download", "--dest", folder] + target + rest + list(BUILD_TOOLS), timeout)


def _find_wheel(folder: str, name: str) -> str:
    for f in sorted(os.listdir(folder)):
        if f.endswith(".whl") and _name(f.split("-")[0]) == name:
            return os.path.join(folder, f)
    raise SystemExit(f"{folder}: pip download left no {name} wheel")


def _run_or_exit(args: List[str], timeout: int) -> None:
    print("+ pip " + " ".join(args), flush=True)
    proc = _pip(args, timeout)
    if proc.returncode != 0:
        raise SystemExit(f"pip {args[0]} failed:\n{proc.stderr[-3000:]}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["check", "download", "requirements"])
    p.add_argument("folder", nargs="?", help="the wheel folder")
    p.add_argument("--python-version", default=DEFAULT_PYTHON,
                   help="target CPython of the GPU host")
    p.add_argument("--platform", action="append", dest="platforms",
                   help=f"target wheel platform tag (repeatable; default {DEFAULT_PLATFORMS})")
    p.add_argument("--torch-version", action="append", dest="torch_versions",
                   help=f"preinstalled torch to check against (repeatable; default "
                        f"{', '.join(DEFAULT_TORCH)})")
    p.add_argument("--extras", default="gpu", help="comma-separated setup.py extras")
    p.add_argument("--setup-py", default=os.path.join(ROOT, "setup.py"))
    p.add_argument("--json", action="store_true", help="check: print the result as JSON")
    args = p.parse_args(argv)
    if args.command != "requirements" and not args.folder:
        p.error(f"{args.command} needs the wheel folder")
    args.platforms = args.platforms or list(DEFAULT_PLATFORMS)
    args.torch_versions = args.torch_versions or list(DEFAULT_TORCH)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    reqs = setup_requirements(args.setup_py, extras)
    if args.command == "requirements":
        print("\n".join(reqs))
        return 0
    if args.command == "download":
        download(args.folder, reqs, args.python_version, args.platforms)
    result = check(args.folder, reqs, args.python_version, args.platforms, args.torch_versions)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for version, names in result["resolved"].items():
            print(f"torch {version} + Python {args.python_version}: {len(names)} packages "
                  f"resolve from {args.folder}")
        for problem in result["problems"]:
            print(f"missing: {problem}", file=sys.stderr)
        print(f"wheel folder {args.folder}: {'complete' if result['ok'] else 'INCOMPLETE'} "
              f"(requirements of setup.py [{','.join(extras)}])")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
