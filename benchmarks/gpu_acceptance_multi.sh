#!/usr/bin/env bash
# Acceptance on a node with 4+ GPUs: NT's tree, averaging and OT over NCCL against one process, the bytes and
# peak memory of the tree against `ntdist run --dry-run`, SyncBatchNorm (2 ranks x B against 1 x 2B), the
# sharded distillation teacher against the whole one, DeepSpeed ZeRO-2 bf16, and `srun` with one GPU per task
# when run inside a SLURM allocation. Synthetic data only; at most 15 minutes. Prints one table (PASS / FAIL /
# SKIP per check, with figures) and exits 1 on any FAIL; docs/PERFORMANCE.md, "On GPUs", says more.
#
#   bash benchmarks/gpu_acceptance_multi.sh               # from the repository root, on the 4-GPU node
#   bash benchmarks/gpu_acceptance_multi.sh --cpu-smoke   # the same checks on 4 gloo CPU ranks, tiny (minutes)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT=900
case " $* " in
    *" --cpu-smoke "*) export CUDA_VISIBLE_DEVICES=""; LIMIT=900 ;;
    *) command -v nvidia-smi >/dev/null && nvidia-smi -L ;;
esac
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}   # DeepSpeed's ops, built once (make test)
timeout --kill-after=20 "$LIMIT" "$PY" benchmarks/gpu_acceptance_multi.py "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "overall: FAIL (the checks ran past ${LIMIT} s)"
fi
exit "$rc"
