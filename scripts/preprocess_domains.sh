#!/usr/bin/env bash
# Domain corpora -> Megatron indexed datasets + manifest: a thin wrapper around
# megatron-ddk build-domains (see docs/data.md).
#
#   # the embedded demo: corpus from text on this machine, tokenizer, datasets, manifest
#   bash scripts/preprocess_domains.sh --demo data/demo [extra build_domains.py flags]
#
#   # your own corpus folder of <domain>.jsonl files
#   bash scripts/preprocess_domains.sh --input corpus/ --output-dir datasets/ \
#       --tokenizer-model tokenizer/ddk.model --train-tokenizer --vocab-size 32000
#
# Environment: PYTHON (default: the repo's .venv, else python3); for --demo also
# DEMO_MAX_MB (1.5), VOCAB_SIZE (8000), VALID_SAMPLES (64), VALID_SEQ_LENGTH (256).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ "${1:-}" == "--demo" ]]; then
  DEMO_DIR="${2:-data/demo}"
  shift; [[ $# -gt 0 ]] && shift
  CORPUS_ARGS=(
    --output-dir "$DEMO_DIR/corpus"
    --max-mb "${DEMO_MAX_MB:-1.5}"
  )
  DOMAIN_ARGS=(
    --input "$DEMO_DIR/corpus"
    --output-dir "$DEMO_DIR/datasets"
    --tokenizer-model "$DEMO_DIR/tokenizer/ddk.model"
    --train-tokenizer
    --vocab-size "${VOCAB_SIZE:-8000}"
    --valid-samples "${VALID_SAMPLES:-64}"
    --valid-seq-length "${VALID_SEQ_LENGTH:-256}"
  )
  "$PYTHON" -m megatron_ddk.cli demo-corpus "${CORPUS_ARGS[@]}"
  exec "$PYTHON" -m megatron_ddk.cli build-domains "${DOMAIN_ARGS[@]}" "$@"
fi

exec "$PYTHON" -m megatron_ddk.cli build-domains "$@"
