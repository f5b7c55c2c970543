"""Prepare, and check, the folder of wheels that installs megatron-ddk on an offline GPU host.

The GPU host is one of the lent GPU machines (docs/gpu.md). Its image already holds torch (CUDA),
numpy, transformers, pytest and about 200 other packages: tools/gpu_image_packages.txt lists them,
copied from the device tool's KINDS.md, and is the one place this tool learns them from. The
folder therefore carries only what the image lacks: megatron-core, and whatever it (and setup.py's
install_requires plus the `gpu` extra) needs that is not in the image. It must travel with the
working tree (64 MiB in all), so it is small (one wheel, 2.6 MB, measured Dec 2026).

On a machine whose pip reaches an index (Linux, macOS or Windows, any Python >= 3.8 with pip):

    python3 tools/check_wheels.py download wheels/       # CPython 3.12, manylinux x86_64

then carry wheels/ with the repository (docs/gpu.md), where scripts/gpu_check.sh installs from it.
Anywhere, before that:

    python3 tools/check_wheels.py check wheels/          # exit 0: complete; 1: what is missing

`download` walks the requirements itself, one `pip download --no-deps` per level, for the target
Python and platform, and never fetches a package the image lists: pip's own resolver would pull
numpy, packaging and torch along with megatron-core.

`check` runs pip's own resolver offline, once per torch minor version (2.11, 2.12, 2.13 by
default): `pip download --no-index --find-links FOLDER --find-links STANDINS --dest TMP
--python-version 3.12 --platform ... --only-binary=:all:` (download, not install --dry-run: only
download checks Requires-Python against the target Python rather than the running one). STANDINS
holds metadata-only wheels that play the image's packages, pinned: torch at the version checked,
the rest at the version the list gives, else the lowest version the requirements allow (named as
an assumption). `--image installed` (the GPU host's own check) pins them at the versions installed
for the running Python instead, and names a listed package that is not installed. A requirement
pip cannot resolve from the folder and the image is named, with pip's own line.

Standard library and pip only (it runs before anything is installed: it uses pip's vendored
`packaging`); imports nothing from megatron_ddk.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, Dict, List, Optional, Sequence

try:
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - every Python with pip has it
    raise SystemExit("tools/check_wheels.py needs pip (python3 -m ensurepip)") from None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_FILE = os.path.join(ROOT, "tools", "gpu_image_packages.txt")
"""The GPU image's packages (name or name==version a line); see the file's own header."""
DEFAULT_PYTHON = "3.12"
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                     "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
DEFAULT_TORCH = ("2.11.0", "2.12.0", "2.13.0")
NEVER_CARRIED = ("torch",)
"""Image packages whose wheel in the folder is an error: the image's CUDA build must stay."""
BUILD_TOOLS = ("setuptools>=70.1",)
"""The project installs with --no-build-isolation: this must come from the image or the folder
(setuptools >= 70.1 builds the editable wheel itself; older ones also need `wheel`)."""


def _name(requirement: str) -> str:
    """The normalised project name of a requirement ("Megatron_Core>=0.16" -> megatron-core)."""
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "-_."):
            requirement = requirement[:i]
            break
    return requirement.strip().lower().replace("_", "-").replace(".", "-")


def _wheel_name(filename: str) -> str:
    return _name(os.path.basename(filename).split("-")[0])


def load_image(path: str = IMAGE_FILE) -> Dict[str, Optional[str]]:
    """{normalised name: version or None} from the image's package list."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file (the GPU image's package list)")
    image: Dict[str, Optional[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, version = (part.strip() for part in line.partition("=="))
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or " " in version:
                raise SystemExit(f"{path}:{number}: expected `name` or `name==version`, "
                                 f"got {line!r}")
            image[_name(name)] = version or None
    return image


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


def target_environment(python_version: str) -> Dict[str, str]:
    """Marker values of the GPU host (CPython on Linux x86_64)."""
    return {"python_version": python_version, "python_full_version": python_version + ".0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": python_version + ".0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "extra": ""}


def _parse(requirement: str) -> Requirement:
    try:
        return Requirement(requirement)
    except InvalidRequirement as e:
        raise SystemExit(f"bad requirement {requirement!r}: {e}") from None


def _applies(req: Requirement, env: Dict[str, str], extras: Sequence[str] = ()) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(dict(env, extra=e)) for e in ("",) + tuple(extras))


def _bare(req: Requirement) -> str:
    """The requirement without its marker: name[extras]specifier."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def wheel_requires(wheel_path: str, env: Dict[str, str], extras: Sequence[str] = ()) -> List[str]:
    """The Requires-Dist lines of a wheel that apply on the target (with `extras` requested)."""
    with zipfile.ZipFile(wheel_path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8")
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = _parse(line.split(":", 1)[1].strip())
            if _applies(req, env, extras):
                out.append(_bare(req))
    return out


def plan_download(requirements: Sequence[str], image: Dict[str, Optional[str]],
                  fetch: Callable[[List[str]], List[str]], env: Dict[str, str]) -> dict:
    """Walk the requirements level by level, fetching (no dependencies) only what `image` lacks.

    fetch(requirement strings) returns the wheel paths it got, one per requirement. Returns
    {"wheels": [path, ...], "from_image": [name, ...]} in the order met.
    """
    wheels: List[str] = []
    from_image: List[str] = []
    seen = set()
    level = [r for r in requirements if _applies(_parse(r), env)]
    while level:
        wanted, extras = [], {}
        for r in level:
            req = _parse(r)
            name = _name(req.name)
            if name in image:
                if name not in from_image:
                    from_image.append(name)
            elif name not in seen:
                seen.add(name)
                wanted.append(_bare(req))
                extras[name] = sorted(req.extras)
        got = fetch(wanted) if wanted else []
        wheels += got
        level = [d for w in got for d in wheel_requires(w, env, extras.get(_wheel_name(w), ()))]
    return {"wheels": wheels, "from_image": from_image}


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


def lowest_allowed(specifiers: Sequence[str]) -> Optional[str]:
    """The lowest version named in (or "0" if allowed by) all the specifier sets, else None."""
    sets = [SpecifierSet(s) for s in specifiers]
    candidates = {"0"} | {s.version.rstrip(".*") for ss in sets for s in ss}
    ordered = []
    for c in candidates:
        try:
            ordered.append(Version(c))
        except InvalidVersion:
            continue
    for v in sorted(ordered):
        if all(ss.contains(v, prereleases=True) for ss in sets):
            return str(v)
    return None


def _pip(args: List[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([sys.executable, "-m", "pip"] + args, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _pip_problem(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    picked = [ln for ln in lines if ln.startswith("ERROR") or "No matching distribution" in ln
              or "conflict" in ln.lower() or "Could not find a version" in ln
              or ln.startswith("The conflict is caused by") or " depends on " in ln]
    return " | ".join(picked[:6] or lines[-3:])


def needed_from_image(folder: str, wheels: Sequence[str], requirements: Sequence[str],
                      image: Dict[str, Optional[str]], env: Dict[str, str]) -> Dict[str, List[str]]:
    """{image package: [specifier, ...]} for each one that the requirements or the folder's wheels
    name (the image must supply it; the specifiers say which versions will do)."""
    needed: Dict[str, List[str]] = {}
    extras: Dict[str, List[str]] = {}
    reqs = [r for r in requirements if _applies(_parse(r), env)]
    for r in reqs:
        extras.setdefault(_name(r), []).extend(sorted(_parse(r).extras))
    for w in wheels:
        reqs += wheel_requires(os.path.join(folder, w), env, extras.get(_wheel_name(w), ()))
    for r in reqs:
        req = _parse(r)
        if _name(req.name) in image:
            needed.setdefault(_name(req.name), []).append(str(req.specifier))
    return needed


def image_pins(needed: Dict[str, List[str]], image: Dict[str, Optional[str]], image_mode: str,
               in_folder: Sequence[str]) -> dict:
    """{"pins": {name: version}, "assumed": [...], "problems": [...]} for the stand-ins of `check`
    (torch excluded: each check run pins its own torch version)."""
    pins: Dict[str, str] = {}
    assumed: List[str] = []
    problems: List[str] = []
    for name in sorted(needed):
        if name == "torch":
            continue
        if image_mode == "installed":
            from importlib import metadata
            try:
                pins[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                if name not in in_folder:
                    problems.append(f"{name}: {IMAGE_FILE} says the image has it, but "
                                    f"{sys.executable} has none installed (fix the list, or "
                                    f"download its wheel into the folder)")
            continue
        version = image[name] or lowest_allowed(needed[name])
        if version is None:
            problems.append(f"{name}: no version satisfies {' and '.join(needed[name])}")
            continue
        pins[name] = version
        if image[name] is None:
            assumed.append(name)
    return {"pins": pins, "assumed": assumed, "problems": problems}


def check(folder: str, requirements: Sequence[str], python_version: str,
          platforms: Sequence[str], torch_versions: Sequence[str],
          image: Dict[str, Optional[str]], image_mode: str = "listed",
          timeout: int = 300) -> dict:
    """{"ok", "problems", "notes", "resolved": {torch version: [name==version from the folder]},
    "image": {name: version pinned}, "assumed": [image packages pinned at a guessed version]}."""
    problems: List[str] = []
    notes: List[str] = []
    resolved: Dict[str, List[str]] = {}
    result = {"ok": False, "problems": problems, "notes": notes, "resolved": resolved,
              "image": {}, "assumed": []}
    if not os.path.isdir(folder):
        problems.append(f"{folder}: no such folder")
        return result
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    if not wheels:
        problems.append(f"{folder}: holds no .whl files")
        return result
    for w in wheels:
        if _wheel_name(w) in NEVER_CARRIED:
            problems.append(f"{folder}/{w}: remove it: {_wheel_name(w)} comes with the GPU "
                            f"host's image and must not be replaced")
        elif _wheel_name(w) in image:
            notes.append(f"{folder}/{w}: not needed, the image has {_wheel_name(w)} (remove it "
                         f"to keep the carried folder small)")
    env = target_environment(python_version)
    all_reqs = list(requirements) + list(BUILD_TOOLS)
    needed = needed_from_image(folder, wheels, all_reqs, image, env)
    pinned = image_pins(needed, image, image_mode, [_wheel_name(w) for w in wheels])
    problems += pinned["problems"]
    result.update(image=pinned["pins"], assumed=pinned["assumed"])
    pins = [f"{n}=={v}" for n, v in pinned["pins"].items()]
    for version in torch_versions:
        with tempfile.TemporaryDirectory() as tmp:
            stand_in_wheel(tmp, "torch", version)
            for n, v in pinned["pins"].items():
                stand_in_wheel(tmp, n, v)
            dest = os.path.join(tmp, "resolved")
            args = (["download", "--no-index", "--find-links", folder, "--find-links", tmp,
                     "--dest", dest, "--quiet"] + target_args(python_version, platforms)
                    + [f"torch=={version}"] + pins + all_reqs)
            proc = _pip(args, timeout)
            if proc.returncode != 0:
                problems.append(f"torch {version}, Python {python_version}: pip cannot resolve "
                                f"from {folder} plus the image ({image_mode} versions): "
                                f"{_pip_problem(proc.stderr)}")
                continue
            resolved[version] = sorted(
                "==".join(f.split("-")[:2]) for f in os.listdir(dest) if f.endswith(".whl")
                and _wheel_name(f) not in pinned["pins"] and _wheel_name(f) != "torch")
    result["ok"] = not problems
    return result


def download(folder: str, requirements: Sequence[str], python_version: str,
             platforms: Sequence[str], image: Dict[str, Optional[str]],
             timeout: int = 1800) -> dict:
    """Fill `folder` with what the image lacks (needs an index): see the module docstring.
    Returns plan_download's result plus "stale": wheels already in the folder that are not in it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"{folder}: exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    target = target_args(python_version, platforms)

    def fetch(reqs: List[str]) -> List[str]:
        got = []
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            _run_or_exit(["download", "--no-deps", "--dest", tmp] + target + reqs, timeout)
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".whl"):
                    os.replace(os.path.join(tmp, f), os.path.join(folder, f))
                    got.append(os.path.join(folder, f))
        return got

    plan = plan_download(list(requirements) + list(BUILD_TOOLS), image, fetch,
                         target_environment(python_version))
    kept = {os.path.basename(w) for w in plan["wheels"]}
    plan["stale"] = sorted(f for f in os.listdir(folder) if f.endswith(".whl") and f not in kept)
    return plan


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f)))


def _run_or_exit(args: List[str], timeout: int) -> None:
    print("+ pip " + " ".join(args), flush=True)
    proc = _pip(args, timeout)
    if proc.returncode != 0:
        raise SystemExit(f"pip {args[0]} failed: {_pip_problem(proc.stderr)}")


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
    p.add_argument("--image-file", default=IMAGE_FILE,
                   help="the GPU image's package list (never downloaded)")
    p.add_argument("--image", choices=["listed", "installed"], default="listed",
                   help="check: the image's versions as the list gives them (any host), or as "
                        "installed for the running Python (on the GPU host)")
    p.add_argument("--json", action="store_true", help="check: print the result as JSON")
    args = p.parse_args(argv)
    if args.command != "requirements" and not args.folder:
        p.error(f"{args.command} needs the wheel folder")
    args.platforms = args.platforms or list(DEFAULT_PLATFORMS)
    args.torch_versions = args.torch_versions or list(DEFAULT_TORCH)
    return args


def _report_download(folder: str, plan: dict) -> None:
    names = ", ".join(f"{_wheel_name(w)} {os.path.basename(w).split('-')[1]}"
                      for w in plan["wheels"])
    size = folder_bytes(folder)
    print(f"downloaded into {folder}: {len(plan['wheels'])} wheel(s) ({names}); the folder holds "
          f"{size} bytes ({size / 2 ** 20:.1f} MiB)")
    print(f"from the GPU image, not downloaded: {', '.join(plan['from_image'])}")
    for f in plan["stale"]:
        print(f"warning: {folder}/{f} was there before and is not needed: remove it to keep the "
              f"carried folder small", file=sys.stderr)


def _report_check(args: argparse.Namespace, extras: Sequence[str], result: dict) -> None:
    for version, names in result["resolved"].items():
        print(f"torch {version} + Python {args.python_version}: {len(names)} package(s) "
              f"resolve from {args.folder} ({', '.join(names)}), {len(result['image']) + 1} "
              f"from the image (torch included)")
    if result["image"]:
        pins = ", ".join(f"{n}=={v}" + (" (assumed)" if n in result["assumed"] else "")
                         for n, v in result["image"].items())
        print(f"image packages ({args.image} versions): {pins}")
    if result["assumed"]:
        print(f"assumed: {os.path.relpath(args.image_file, ROOT)} gives no version for "
              f"{', '.join(result['assumed'])}; checked at the lowest version the requirements "
              f"allow (the GPU host's own check uses the installed ones)")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for problem in result["problems"]:
        print(f"missing: {problem}", file=sys.stderr)
    print(f"wheel folder {args.folder}: {'complete' if result['ok'] else 'INCOMPLETE'} "
          f"(requirements of setup.py [{','.join(extras)}])")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    reqs = setup_requirements(args.setup_py, extras)
    if args.command == "requirements":
        print("\n".join(reqs))
        return 0
    image = load_image(args.image_file)
    if args.command == "download":
        _report_download(args.folder, download(args.folder, reqs, args.python_version,
                                               args.platforms, image))
    result = check(args.folder, reqs, args.python_version, args.platforms, args.torch_versions,
                   image, args.image)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _report_check(args, extras, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
