#!/usr/bin/env bash
# Install the system packages the launcher tests need: SLURM (slurm-wlm: slurmctld, slurmd, srun,
# sbatch) and munge for the one-node test cluster, and g++ for the op DeepSpeed compiles on first use.
# MPI needs no system package: `pip install 'ntdist[mpi]'` brings mpi4py and Open MPI's mpirun.
#
# Usage:
#     sudo scripts/install_system_deps.sh
# Idempotent: returns at once when everything is installed. Without root or without apt-get it
# installs nothing, says what is missing and how to install it, and exits 0 (the tests that need the
# missing programs then fail with the same advice). Set NTDIST_DEPS_STRICT=1 to exit 1 instead.
set -euo pipefail

packages=(slurm-wlm munge g++)
programs=(slurmctld slurmd srun sbatch scontrol sinfo munged munge g++)

missing=()
for prog in "${programs[@]}"; do
    command -v "$prog" >/dev/null 2>&1 || [[ -x /usr/sbin/$prog ]] || missing+=("$prog")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_system_deps: slurm-wlm, munge and g++ already installed"
    exit 0
fi

skip() {
    echo "install_system_deps: $1; not installing (missing: ${missing[*]})." >&2
    echo "install_system_deps: install them with: sudo apt-get update && sudo apt-get install -y ${packages[*]}" >&2
    [[ ${NTDIST_DEPS_STRICT:-0} == 1 ]] && exit 1
    exit 0
}

[[ $(id -u) -eq 0 ]] || skip "not root"
command -v apt-get >/dev/null 2>&1 || skip "apt-get not found (not a Debian/Ubuntu system)"

echo "install_system_deps: installing ${packages[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "install_system_deps: done"
