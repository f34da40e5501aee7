#!/usr/bin/env bash
# Start, check or stop a one-node SLURM cluster on this machine, for testing the SLURM launcher.
#
# Usage (as root, after scripts/install_system_deps.sh installed slurm-wlm and munge):
#     tests/launchers/slurm_cluster.sh start     # munged + slurmctld + slurmd; waits until the node is idle
#     eval "$(tests/launchers/slurm_cluster.sh env)"   # export SLURM_CONF so sinfo/sbatch/srun find the cluster
#     sbatch --wait launch/slurm.sbatch CONFIG
#     tests/launchers/slurm_cluster.sh status    # sinfo; exit 0 when the node is up
#     tests/launchers/slurm_cluster.sh stop      # stops the daemons this script started
#
# Configuration, state, spool, pid and log files live under $NTDIST_SLURM_DIR (default /tmp/ntdist-slurm).
# The node is this host (`hostname -s`) with all its cores, in the default partition `debug`.
# Environment:
#     NTDIST_SLURM_DIR        working directory of the cluster (default /tmp/ntdist-slurm)
#     NTDIST_SLURM_PORT       slurmctld port; slurmd uses the next one (default 6817)
#     NTDIST_SLURM_WAIT       seconds to wait for the node to become idle (default 60)
#     NTDIST_SLURM_GPUS       stand-in GPUs the node offers (gres gpu, no devices; default 2), so job
#                             scripts with --gpus-per-node run unchanged on a machine without GPUs
# Starting an already running cluster does nothing; munged is reused when one already answers.
set -euo pipefail

DIR=${NTDIST_SLURM_DIR:-/tmp/ntdist-slurm}
CONF=$DIR/etc/slurm.conf
PORT=${NTDIST_SLURM_PORT:-6817}
WAIT=${NTDIST_SLURM_WAIT:-60}
GPUS=${NTDIST_SLURM_GPUS:-2}
HOST=$(hostname -s)
export SLURM_CONF=$CONF

die() {
    echo "slurm_cluster.sh: $*" >&2
    exit 1
}

show_logs() {
    local log
    for log in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log /var/log/munge/munged.log; do
        [[ -f $log ]] || continue
        echo "---- last lines of $log" >&2
        tail -n 25 "$log" >&2
    done
}

pid_alive() {   # pid_alive FILE: the process named in FILE is running
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

node_state() {
    sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'
}

write_conf() {
    mkdir -p "$DIR"/etc "$DIR"/state "$DIR"/spool "$DIR"/log "$DIR"/run
    cat > "$CONF" <<EOF
# One-node test cluster written by tests/launchers/slurm_cluster.sh
ClusterName=ntdist
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=10
MinJobAge=300
GresTypes=gpu
NodeName=$HOST CPUs=$(nproc) RealMemory=8000 $( ((GPUS > 0)) && echo "Gres=gpu:$GPUS") State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    # Stand-in GPUs, so that job scripts asking for --gpus-per-node run unchanged: slurmd only counts
    # GPUs that have a device file, so each one is a copy of /dev/null (char 1,3).
    mkdir -p "$DIR/dev"
    local i
    for ((i = 0; i < GPUS; i++)); do
        [[ -c $DIR/dev/gpu$i ]] || mknod "$DIR/dev/gpu$i" c 1 3
    done
    {
        echo "AutoDetect=off"
        if ((GPUS > 0)); then echo "NodeName=$HOST Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]"; fi
    } > "$DIR/etc/gres.conf"
}

start_munge() {
    if munge_works; then
        return
    fi
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing; reinstall munge (scripts/install_system_deps.sh)"
    # munged runs as the munge user, which may not reach $DIR: it keeps its usual paths.
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged \
        || { show_logs; die "munged did not start"; }
    touch "$DIR/run/munged.ours"
    local i
    for i in $(seq 1 50); do
        munge_works && return
        sleep 0.2
    done
    show_logs
    die "munged started but does not answer (munge -n | unmunge fails)"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd runs jobs as any user)"
    local prog
    for prog in munged munge slurmctld slurmd sinfo; do
        command -v "$prog" >/dev/null 2>&1 || [[ -x /usr/sbin/$prog ]] \
            || die "$prog is not installed; run: sudo scripts/install_system_deps.sh  (apt-get install slurm-wlm munge)"
    done
    export PATH=$PATH:/usr/sbin
    if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid"; then
        echo "slurm_cluster.sh: already running (SLURM_CONF=$CONF)"
    else
        stop_daemons
        rm -rf "$DIR"/state "$DIR"/spool "$DIR"/log
        write_conf
        start_munge
        slurmctld -f "$CONF" || { show_logs; die "slurmctld did not start"; }
        slurmd -f "$CONF" || { show_logs; die "slurmd did not start"; }
    fi
    local deadline=$((SECONDS + WAIT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle|mix|alloc) echo "slurm_cluster.sh: node $HOST is $state (SLURM_CONF=$CONF)"; return 0 ;;
            inval) break ;;
            down|drain|drng|fail)
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    sinfo >&2 || true
    show_logs
    die "node $HOST not idle after ${WAIT}s (state: '${state:-no answer from slurmctld}')"
}

stop_pidfile() {   # stop_pidfile FILE NAME: TERM the process in FILE, KILL it after 10 s
    local file=$1 name=$2 pid i
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
        sleep 0.2
    done
    echo "slurm_cluster.sh: $name ($pid) ignored TERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop_daemons() {
    if pid_alive "$DIR/run/slurmctld.pid"; then
        scancel --full --quiet --user root >/dev/null 2>&1 || true
    fi
    stop_pidfile "$DIR/run/slurmd.pid" slurmd
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
}

stop() {
    stop_daemons
    if [[ -f $DIR/run/munged.ours ]]; then
        stop_pidfile /run/munge/munged.pid munged
        rm -f "$DIR/run/munged.ours"
    fi
    echo "slurm_cluster.sh: stopped"
}

status() {
    if ! pid_alive "$DIR/run/slurmctld.pid" || ! pid_alive "$DIR/run/slurmd.pid"; then
        echo "slurm_cluster.sh: not running"
        return 1
    fi
    sinfo
    case $(node_state) in
        idle|mix|alloc) return 0 ;;
        *) return 1 ;;
    esac
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
