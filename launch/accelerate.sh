#!/usr/bin/env bash
# Launch `ntdist run CONFIG [key=value ...]` with `accelerate launch` and launch/accelerate.yaml.
#
# Usage:
#     NPROC=4 launch/accelerate.sh configs/quickstart.yaml train.epochs=2
# Without a GPU the script sets ACCELERATE_USE_CPU=true, so the NPROC processes still start and join
# one gloo world (accelerate's own `--cpu` would start only one process).
#
# Environment:
#     NPROC          processes (default 2; set it to the number of GPUs)
#     MAIN_PORT      rendezvous port (default 0: a free port)
#     ACCELERATE     the accelerate command (default: accelerate)
#     ACCELERATE_CONFIG  config file (default: accelerate.yaml next to this script)
#     NTDIST         the ntdist command (default: ntdist if on PATH, else python3 -m ntdist)
#     GLOO_SOCKET_IFNAME  several nodes with several network interfaces: the one the nodes reach each other
#                    on (e.g. ib0); ntdist's wait and heartbeat groups use gloo also under NCCL
# Every argument after the config is passed on to `ntdist run`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"
read -r -a accelerate_cmd <<< "${ACCELERATE:-accelerate}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-true}
fi

exec "${accelerate_cmd[@]}" launch --config_file "${ACCELERATE_CONFIG:-$here/accelerate.yaml}" \
    --num_processes "${NPROC:-2}" --main_process_port "${MAIN_PORT:-0}" --no_python \
    "${ntdist_cmd[@]}" run "$@"
