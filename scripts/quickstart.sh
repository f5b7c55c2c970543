#!/usr/bin/env bash
# The embedded default, end to end on this machine: set up the environment, build a 5-domain demo
# corpus from text already on the machine, train a tokenizer, preprocess, pre-train a small
# teacher and a smaller student, continue the student as CPT, KD and DDK on the same token budget,
# evaluate per-domain perplexity, and write runs/quickstart/report.md with plots.
#   bash scripts/quickstart.sh            # full demo (14 minutes measured on 2 idle CPU cores)
#   bash scripts/quickstart.sh --smoke    # every stage on a tiny budget (about 2 minutes)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
setup_start=$(date +%s)
# shellcheck source=scripts/setup_env.sh disable=SC1091
source "$ROOT/scripts/setup_env.sh" test
echo "[quickstart] environment ready in $(( $(date +%s) - setup_start )) s"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec megatron-ddk quickstart "$@"
