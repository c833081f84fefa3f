#!/usr/bin/env bash
# torchrun on one node or several (static rendezvous at MASTER_ADDR:MASTER_PORT).
#
#   launch/torchrun.sh TRAIN_SCRIPT [ARGS...]                                    # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh TRAIN_SCRIPT ... # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh TRAIN_SCRIPT ... # node 1
#
# Environment (defaults in brackets): NPROC_PER_NODE [GPUs on this node, or 2 on CPU],
# NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500],
# OMP_NUM_THREADS [1]. On a machine without CUDA it sets DS_ACCELERATOR=cpu (gloo).
set -euo pipefail
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
else
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ $# -lt 1 ]]; then
  echo "usage: [NNODES=N NODE_RANK=R MASTER_ADDR=A] $0 TRAIN_SCRIPT [ARGS...]" >&2
  exit 2
fi
exec python -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
