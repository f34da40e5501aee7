#!/usr/bin/env bash
# Launch `ntdist run CONFIG [key=value ...]` with mpirun, one rank per GPU (or CPU worker).
# ntdist reads its rank from OMPI_COMM_WORLD_* (Open MPI) or PMI_* (MPICH, Intel MPI); rank 0 shares
# its address and a free port through mpi4py (`pip install 'ntdist[mpi]'` installs mpi4py and an Open MPI
# whose mpirun lands next to python in the environment).
#
# Usage:
#     NP=2 launch/mpirun.sh configs/quickstart.yaml train.epochs=2
#     NP=16 HOSTFILE=hosts.txt launch/mpirun.sh CONFIG          # several nodes ("node0 slots=8" lines)
#     NP=4 OVERSUBSCRIBE=1 launch/mpirun.sh CONFIG              # more ranks than cores (CPU tests)
#
# Environment:
#     NP             number of ranks (default 2)
#     HOSTFILE       Open MPI hostfile for several nodes (default: this node only)
#     OVERSUBSCRIBE  1 to allow more ranks than cores (Open MPI --oversubscribe)
#     MPIRUN         the mpirun command (default: mpirun)
#     MPIRUN_ARGS    extra mpirun flags, e.g. "--bind-to none --map-by ppr:8:node"
#     NTDIST         the ntdist command (default: ntdist if on PATH, else python3 -m ntdist)
# As root, Open MPI refuses to start unless OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1: the script sets both.
# With Open MPI the variables PATH, PYTHONPATH, LD_LIBRARY_PATH, VIRTUAL_ENV, MASTER_PORT, OMP_NUM_THREADS,
# CUDA_VISIBLE_DEVICES, TORCH_EXTENSIONS_DIR, GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME and every NTDIST_*
# variable that is set are passed to all ranks with -x (other MPIs pass the whole environment themselves).
# Nodes with several network interfaces: set GLOO_SOCKET_IFNAME (e.g. eth0 or ib0) to the interface the
# nodes reach each other on. ntdist's wait and heartbeat groups are gloo groups also under NCCL, and gloo
# otherwise binds to the interface of the host name, which may be one the other nodes cannot reach.
# Every argument after the config is passed on to `ntdist run`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
read -r -a mpirun_cmd <<< "${MPIRUN:-mpirun}"
read -r -a extra <<< "${MPIRUN_ARGS:-}"

flags=(-np "${NP:-2}")
if "${mpirun_cmd[@]}" --version 2>/dev/null | grep -q "Open MPI\|Open RTE\|OpenRTE"; then
    if [[ $(id -u) -eq 0 ]]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
    [[ ${OVERSUBSCRIBE:-0} == 1 ]] && flags+=(--oversubscribe)
    [[ -n ${HOSTFILE:-} ]] && flags+=(--hostfile "$HOSTFILE")
    for var in PATH PYTHONPATH LD_LIBRARY_PATH VIRTUAL_ENV MASTER_PORT OMP_NUM_THREADS CUDA_VISIBLE_DEVICES \
               TORCH_EXTENSIONS_DIR GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME $(compgen -v NTDIST_ || true); do
        [[ -n ${!var+x} ]] && flags+=(-x "$var")
    done
else
    # MPICH / Intel MPI (hydra): the environment is passed on by default.
    [[ -n ${HOSTFILE:-} ]] && flags+=(-f "$HOSTFILE")
fi

exec "${mpirun_cmd[@]}" "${flags[@]}" "${extra[@]}" "${ntdist_cmd[@]}" run "$@"
