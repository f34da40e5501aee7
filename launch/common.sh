# Shared start of launch/torchrun.sh, accelerate.sh and mpirun.sh; sourced, not run.
# Prints the calling script's header comment for -h/--help (exit 0) or a missing config (exit 2), and sets the
# array ntdist_cmd from $NTDIST (default: ntdist if on PATH, else python3 -m ntdist).
# (slurm.sbatch carries its own copy: sbatch runs a spooled copy of the script, away from this file.)

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ $# -ge 1 ]] && exit 0   # asked for help
    exit 2                     # no config given
fi

if [[ -z ${NTDIST:-} ]]; then
    if command -v ntdist >/dev/null 2>&1; then NTDIST=ntdist; else NTDIST="python3 -m ntdist"; fi
fi
read -r -a ntdist_cmd <<< "$NTDIST"
