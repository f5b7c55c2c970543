#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) and install megatron-ddk into it.
# Idempotent: a second run with an unchanged setup.py only checks a stamp file.
# On a host without an NVIDIA GPU torch's CPU build is installed first, so nothing can pull a
# multi-GB CUDA build; on a GPU host an existing CUDA torch in the venv is kept.
# Usage: source scripts/setup_env.sh [extras]   (extras default: test)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"
VENV="${MEGATRON_DDK_VENV:-$ROOT/.venv}"
CPU_TORCH="torch==2.13.0"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.megatron_ddk_installed"
WANT="$(cat "$ROOT/setup.py" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)-$EXTRAS"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "[setup] environment up to date ($VENV)"
else
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      echo "[setup] GPU host: installing torch (CUDA build from the default index)"
      "${PIP[@]}" "torch>=2.11,<2.14"
    else
      echo "[setup] CPU host: installing $CPU_TORCH (CPU build) before anything that needs torch"
      "${PIP[@]}" "$CPU_TORCH"
    fi
  fi
  echo "[setup] installing megatron-ddk[$EXTRAS] (editable)"
  "${PIP[@]}" -e "${ROOT}[${EXTRAS}]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
