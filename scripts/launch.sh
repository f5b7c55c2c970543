#!/usr/bin/env bash
# Launch a megatron-ddk training run with torchrun, on one node or as one node of many.
#
#   scripts/launch.sh CONFIG.yaml [section.field=value ...]
#
# Single node, 8 GPUs:
#   NPROC_PER_NODE=8 scripts/launch.sh examples/presets/qwen1.5_7b_to_1.8b.yaml
# Multi-node by hand (run on every node, NODE_RANK 0..NNODES-1, same MASTER_ADDR/PORT):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 scripts/launch.sh CONFIG.yaml
# Under SLURM use scripts/slurm_distill.sbatch, which runs this script once per node.
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: GPUs visible to nvidia-smi, else 1)
#   NNODES          nodes (default 1)
#   NODE_RANK       this node's rank (default: SLURM_NODEID, else 0)
#   MASTER_ADDR     rendezvous host (default 127.0.0.1)
#   MASTER_PORT     rendezvous port (default 29500)
#   PYTHON          interpreter (default: the repo's .venv/bin/python, else python on PATH)
#   SIGNALS_TO_HANDLE  signals torchrun forwards to the trainer (default SIGTERM,SIGINT,SIGHUP,
#                   SIGQUIT,SIGUSR1,SIGUSR2); the trainer saves a checkpoint and exits 0 on
#                   SIGTERM/SIGUSR1 (checkpoint.save_on_signal)
#   SHUTDOWN_TIMEOUT seconds torchrun waits for that save before SIGKILL (default 240)
#   EXTRA_TORCHRUN_ARGS  extra torchrun flags, split on spaces (e.g. "--redirects 3")
# The last command is exec'ed, so signals sent to this script reach torchrun directly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 0
fi
CONFIG="$1"
shift
if [[ ! -f "$CONFIG" ]]; then
  echo "launch.sh: config file $CONFIG does not exist" >&2
  exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
  else
    PYTHON="$(command -v python || command -v python3)"
  fi
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
  else
    NPROC_PER_NODE=1
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

# torchrun >= 2.9 reads these (older versions ignore them and forward only SIGTERM/SIGINT/...):
# forward SIGUSR1 too, and give the trainer time to write its checkpoint before SIGKILL.
export PET_SIGNALS_TO_HANDLE="${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-240}"
# Megatron-Core overlaps TP communication with compute only when kernels are queued in order.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

DISTRIBUTED_ARGS=(
  --nproc_per_node "$NPROC_PER_NODE"
  --nnodes "$NNODES"
  --node_rank "$NODE_RANK"
  --master_addr "$MASTER_ADDR"
  --master_port "$MASTER_PORT"
)
EXTRA_ARGS=()
if [[ -n "${EXTRA_TORCHRUN_ARGS:-}" ]]; then
  read -r -a EXTRA_ARGS <<< "$EXTRA_TORCHRUN_ARGS"
fi
TRAIN_ARGS=(
  -m megatron_ddk.train
  --config "$CONFIG"
)

echo "[launch] node $NODE_RANK/$NNODES, $NPROC_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
# torchrun's launcher, with a failed worker reported in one line (megatron_ddk/parallel/torchrun.py)
echo "[launch] $PYTHON -m megatron_ddk.parallel.torchrun ${DISTRIBUTED_ARGS[*]} ${TRAIN_ARGS[*]} $*" >&2
exec "$PYTHON" -m megatron_ddk.parallel.torchrun "${DISTRIBUTED_ARGS[@]}" "${EXTRA_ARGS[@]}" \
  "${TRAIN_ARGS[@]}" "$@"
