#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test-suite on this host.
# Extra arguments go to pytest, e.g. scripts/test.sh -k config -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh disable=SC1091
source "$ROOT/scripts/setup_env.sh" test
start=$(date +%s)
python -m pytest tests "$@"
echo "[test] pytest wall time: $(( $(date +%s) - start )) s"
