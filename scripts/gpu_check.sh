#!/usr/bin/env bash
# Verify a GPU host in one command (docs/gpu.md): install megatron-ddk from a folder of wheels
# without network, then, on one H100/H200, run the GPU tests, the single-GPU throughput benchmark
# (CPT, KD bf16 teacher, FP8 rows when Transformer Engine is installed, DDK) and a bf16-vs-fp32
# loss agreement check, and write runs/gpu_check/report.md. Every step has a time limit; the
# limits add up to 8 minutes. Nothing reaches the network (pip runs with --no-index).
#
# Usage: scripts/gpu_check.sh [--wheels DIR] [--dry-run] [--out DIR]
#   --wheels DIR  folder of wheels made with `python3 tools/check_wheels.py download DIR` on a
#                 networked machine: what the GPU image lacks (default: $MEGATRON_DDK_WHEELS,
#                 else shared/wheels or wheels/ inside the repository)
#   --dry-run     list every step and check that the wheel folder plus the image's packages
#                 (tools/gpu_image_packages.txt) are complete for Python 3.12 with torch 2.11-2.13
#                 (any host, no GPU needed); installs and runs nothing
#   --out DIR     output folder (default runs/gpu_check)
# Environment: PYTHON (default python3), GPU_CHECK_PYTHON_VERSION (default 3.12, dry run only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${MEGATRON_DDK_WHEELS:-}"
DRY_RUN=0
OUT="$ROOT/runs/gpu_check"

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#*=}"; shift ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

if [[ -z "$WHEELS" ]]; then
  for candidate in "$ROOT/shared/wheels" "$ROOT/wheels"; do
    if [[ -d "$candidate" ]]; then WHEELS="$candidate"; break; fi
  done
fi
[[ -n "$WHEELS" ]] || die "no wheel folder: pass --wheels DIR, set MEGATRON_DDK_WHEELS, or put \
one at shared/wheels or wheels/ in the repository (make it with: python3 tools/check_wheels.py \
download DIR, on a networked machine; docs/gpu.md)"
[[ -d "$WHEELS" ]] || die "wheel folder $WHEELS does not exist"
WHEELS="$(cd "$WHEELS" && pwd)"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

VENV="$OUT/venv"
VPY="$VENV/bin/python"
GPU_TESTS=(tests/models/test_te_fp8.py tests/training/test_bf16.py)
NEEDED=(setup.py tools/check_wheels.py tools/gpu_image_packages.txt bench/gpu_throughput.py bench/gpu_bench_models.py
        bench/gpu_bench_runner.py bench/gpu_precision.py bench/gpu_check_report.py "${GPU_TESTS[@]}")
# name | seconds | what it does (limits add up to 480 s)
STEPS=(
  "host|15|nvidia-smi sees a GPU; $PYTHON imports torch 2.11-2.13 with CUDA"
  "wheels|30|tools/check_wheels.py check $WHEELS --image installed (this host's packages)"
  "install|80|venv $VENV that sees $PYTHON's packages (keeps the CUDA torch); pip install --no-index --find-links $WHEELS -e .[gpu]"
  "gpu_tests|170|pytest ${GPU_TESTS[*]} (TP=2 cases skip on 1 GPU)"
  "throughput|130|bench/gpu_throughput.py --pair llama --seq-lengths 2048 (CPT, KD bf16, FP8 if TE, DDK)"
  "precision|35|bench/gpu_precision.py --pair llama --seq-length 2048 (bf16 vs fp32 loss)"
  "report|15|bench/gpu_check_report.py -> $OUT/report.md"
)

list_steps() {
  local i=1 entry name secs what
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name secs what <<<"$entry"
    printf '  %d. %-10s (<= %3s s) %s\n' "$i" "$name" "$secs" "$what"
    i=$((i + 1))
  done
}

check_files() {
  local f missing=0
  for f in "${NEEDED[@]}"; do
    if [[ ! -f "$ROOT/$f" ]]; then echo "gpu_check: missing $ROOT/$f" >&2; missing=1; fi
  done
  return "$missing"
}

if [[ "$DRY_RUN" == 1 ]]; then
  echo "gpu_check --dry-run: repository $ROOT, wheels $WHEELS, output $OUT"
  echo "steps on a GPU host:"
  list_steps
  check_files || die "the repository copy is incomplete (files above)"
  echo "checking the wheel folder for Python ${GPU_CHECK_PYTHON_VERSION:-3.12}, torch 2.11-2.13," \
    "with the image's packages as tools/gpu_image_packages.txt lists them:"
  "$PYTHON" "$ROOT/tools/check_wheels.py" check "$WHEELS" \
    --python-version "${GPU_CHECK_PYTHON_VERSION:-3.12}" \
    --torch-version 2.11.0 --torch-version 2.12.0 --torch-version 2.13.0
  echo "gpu_check --dry-run: ok"
  exit 0
fi

mkdir -p "$OUT"
: > "$OUT/steps.tsv"
check_files || die "the repository copy is incomplete (files above)"
echo "gpu_check: repository $ROOT, wheels $WHEELS, output $OUT"
list_steps
FAILED=0

# run_step NAME SECONDS COMMAND...: time-limited, logged to $OUT/NAME.log, recorded in steps.tsv
run_step() {
  local name="$1" secs="$2" rc=0 start
  shift 2
  start=$(date +%s)
  echo "[gpu_check] $name (limit ${secs} s) ..."
  timeout --kill-after=10 "$secs" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$name.log" >> "$OUT/steps.tsv"
  if [[ "$rc" != 0 ]]; then
    FAILED=1
    echo "[gpu_check] $name FAILED (exit $rc; 124 = time limit); last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" || true
  fi
  return "$rc"
}

# shellcheck disable=SC2329  # run through `bash -c` (exported below) so `timeout` can limit it
host_step() {
  set -euo pipefail
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" - "$OUT/host.json" <<'EOF'
import json, platform, sys
import torch
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: this torch has no CUDA or sees no GPU")
major_minor = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if not (2, 11) <= major_minor < (2, 14):
    sys.exit(f"torch {torch.__version__}: setup.py needs 2.11 <= torch < 2.14")
try:
    import transformer_engine
    te = getattr(transformer_engine, "__version__", "installed")
except Exception:
    te = "not installed"
info = {"gpu": torch.cuda.get_device_name(), "gpu_count": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "transformer_engine": te}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF
}

# shellcheck disable=SC2329
install_step() {
  set -euo pipefail
  if [[ ! -x "$VPY" ]]; then "$PYTHON" -m venv --system-site-packages "$VENV"; fi
  # The image's python3 is itself a venv (/opt/torch/.venv): --system-site-packages would reach
  # the base interpreter's packages, not its torch. A .pth puts $PYTHON's own site-packages on the
  # path, after the venv's, so pip counts the image's packages as installed and keeps them.
  "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' \
    > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu_image.pth"
  "$VPY" -m pip install --no-index --find-links "$WHEELS" "setuptools>=70.1"
  "$VPY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e "${ROOT}[gpu]"
  "$VPY" -c "import torch, megatron.core, megatron_ddk; assert torch.cuda.is_available(), \
'the venv lost the CUDA torch'; print('torch', torch.__version__, 'megatron-core', \
megatron.core.__version__)"
}

# stop early: still leave a report saying how far it got (the writer needs only the standard library)
stop() {
  "$PYTHON" "$ROOT/bench/gpu_check_report.py" "$OUT" >/dev/null 2>&1 || true
  echo "gpu_check: $2; report $OUT/report.md" >&2
  exit "$1"
}

export -f host_step install_step
export OUT PYTHON VENV VPY WHEELS ROOT
run_step host 15 bash -c host_step || stop 2 "this host cannot run the check"
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
run_step wheels 30 "$PYTHON" "$ROOT/tools/check_wheels.py" check "$WHEELS" --image installed \
  --python-version "$PY_VERSION" --torch-version "$TORCH_VERSION" || stop 1 "incomplete wheel folder"
run_step install 80 bash -c install_step || stop 1 "the install failed"

cd "$ROOT"
run_step gpu_tests 170 "$VPY" -m pytest -q -p no:cacheprovider --timeout 160 \
  --junitxml "$OUT/pytest.xml" "${GPU_TESTS[@]}" || true
run_step throughput 130 "$VPY" bench/gpu_throughput.py --pair llama --seq-lengths 2048 \
  --warmup 2 --steps 6 --json-out "$OUT/throughput.json" || true
run_step precision 35 "$VPY" bench/gpu_precision.py --pair llama --seq-length 2048 \
  --json-out "$OUT/precision.json" || true
run_step report 15 "$VPY" bench/gpu_check_report.py "$OUT" || true
echo "gpu_check: report $OUT/report.md"
exit "$FAILED"
