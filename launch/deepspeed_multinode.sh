#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and no ssh: run this script on every node,
# each with its own NODE_RANK. The hostfile fixes the node count and processes per node.
#
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/deepspeed_multinode.sh TRAIN_SCRIPT [ARGS...]   # on node0
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/deepspeed_multinode.sh TRAIN_SCRIPT [ARGS...]   # on node1
#
# Environment (defaults in brackets):
#   HOSTFILE [launch/hostfile]   MASTER_ADDR [127.0.0.1]   MASTER_PORT [29500]   NODE_RANK [0]
#   NPROC_PER_NODE [slots of the first hostfile line]: processes on this node. On CPU the
#     deepspeed launcher starts one process unless --num_accelerators says otherwise, so it
#     is always passed; OMP_NUM_THREADS [1] keeps the CPU processes from oversubscribing cores.
# TRAIN_SCRIPT is a Python script (e.g. one using littlebird_ds.train.engine); the launcher
# passes it --local_rank=N, which add_training_arguments accepts.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOSTFILE="${HOSTFILE:-$here/hostfile}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NODE_RANK="${NODE_RANK:-0}"
if [[ ! -f "$HOSTFILE" ]]; then
  echo "deepspeed_multinode.sh: hostfile $HOSTFILE not found; set HOSTFILE or create launch/hostfile" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(grep -v '^\s*#' "$HOSTFILE" | grep -m1 -o 'slots=[0-9]*' | cut -d= -f2)"
fi
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ $# -lt 1 ]]; then
  echo "usage: NODE_RANK=R MASTER_ADDR=A $0 TRAIN_SCRIPT [ARGS...]" >&2
  exit 2
fi
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --num_accelerators "$NPROC_PER_NODE" "$@"
