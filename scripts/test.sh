#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test-suite on this host.
# Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh disable=SC1091
source "$ROOT/scripts/setup_env.sh" test
# Lint first: pyflakes + import order + no print() in the package (ruff, pyproject.toml) and
# design.md's import layers (import-linter). Either failing fails the script.
echo "[test] ruff check" >&2
ruff check .
echo "[test] lint-imports (design.md layers)" >&2
lint-imports
start=$(date +%s)
python -m pytest tests --durations=25 "$@"
echo "[test] pytest wall time: $(( $(date +%s) - start )) s"
