#!/usr/bin/env bash
# Launch `ntdist run CONFIG [key=value ...]` with torchrun, one process per GPU (or CPU worker).
#
# Single node (default 2 processes):
#     NPROC=4 launch/torchrun.sh configs/quickstart.yaml train.epochs=2
# Several nodes, static rendezvous (run the same line on every node, NODE_RANK 0..NNODES-1):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 launch/torchrun.sh CONFIG
# Several nodes, elastic c10d rendezvous (no node ranks needed; RDZV_ID must be the same on every node):
#     NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=myjob NPROC=8 launch/torchrun.sh CONFIG
#
# Environment:
#     NPROC          processes on this node (default 2; set it to the number of GPUs)
#     NNODES         nodes in the job (default 1)
#     NODE_RANK      this node's index for the static rendezvous (default 0)
#     MASTER_ADDR    address of node 0 for the static rendezvous (default 127.0.0.1)
#     MASTER_PORT    port on node 0 for the static rendezvous (default 29500)
#     RDZV_ENDPOINT  host:port of the c10d rendezvous; selects the elastic rendezvous when set
#     RDZV_ID        job id shared by all nodes of an elastic rendezvous (default ntdist)
#     TORCHRUN       the torchrun command (default: torchrun)
#     NTDIST         the ntdist command (default: ntdist if on PATH, else python3 -m ntdist)
#     GLOO_SOCKET_IFNAME  several nodes with several network interfaces: the one the nodes reach each other
#                    on (e.g. ib0); ntdist's wait and heartbeat groups use gloo also under NCCL
# Every argument after the config is passed on to `ntdist run`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
read -r -a torchrun_cmd <<< "${TORCHRUN:-torchrun}"

NPROC=${NPROC:-2}
NNODES=${NNODES:-1}

if [[ -n ${RDZV_ENDPOINT:-} ]]; then
    rendezvous=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-ntdist}")
elif [[ $NNODES -gt 1 ]]; then
    rendezvous=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}"
                --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
else
    # One node: torchrun picks a free local port itself.
    rendezvous=(--standalone --nnodes 1)
fi

exec "${torchrun_cmd[@]}" "${rendezvous[@]}" --nproc_per_node "$NPROC" --no-python \
    "${ntdist_cmd[@]}" run "$@"
